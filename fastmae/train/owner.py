"""One run folder, one command: the command that first writes into a folder owns it, and another command's run
there is refused before anything is written.

Two commands in one folder overwrite each other's config.json and mix their files (a linear probe's head
checkpoint sorting as a pretraining run's newest, knn.json beside linprobe's config): neither run can be read
or resumed afterwards. The owner is recorded in `.fastmae.command`; folders written before that file existed are
recognised by their checkpoints' `kind` and their result files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks import DENSE_TASKS
from ..weights.checkpoint import atomic_write_text, list_checkpoints

OWNER_NAME = ".fastmae.command"
# a file only one command writes -> that command (for folders without OWNER_NAME)
RESULT_OF = {"knn.json": "knn", "linprobe.json": "linprobe", "finetune.json": "finetune",
             **{row.result: row.command for row in DENSE_TASKS},
             "train.safetensors": "embed", "train.features.npy": "embed"}
# checkpoint meta 'kind' -> the command that writes it
COMMAND_OF_KIND = {"mae": "fastmae pretrain", "vit": "fastmae finetune", "linprobe": "fastmae linprobe",
                   **{row.kind: f"fastmae {row.command}" for row in DENSE_TASKS}}
IGNORED = {OWNER_NAME, ".fastmae.lock"}
# the files a dense task writes: in a folder that no fastmae run owns, they are the user's and are not replaced
OUTPUTS_OF = {**{row.command: (row.result, *row.outputs) for row in DENSE_TASKS},
              "predict": ("predictions.json", "masks", "vis")}


def command_of(cfg) -> str | None:
    """The subcommand a config belongs to (its module in fastmae.commands), None for any other object."""
    module = type(cfg).__module__
    return module.rsplit(".", 1)[1] if module.startswith("fastmae.commands.") else None


def folder_command(out: Path) -> str | None:
    """The command whose run the folder holds, or None (a new, empty or unrecognised folder)."""
    try:
        data = json.loads((out / OWNER_NAME).read_text())
        return str(data["command"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for ckpt in reversed(list_checkpoints(out)):
        try:
            kind = json.loads(ckpt.with_suffix(".json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            continue
        if kind in COMMAND_OF_KIND:
            return COMMAND_OF_KIND[kind].split()[1]
    for name, command in RESULT_OF.items():  # a run's result beside its config (a file of that name alone: the user's)
        if (out / name).exists() and (out / "config.json").exists():
            return command
    return None


def _holds_outputs(out: Path) -> bool:
    """Whether the folder has anything but the lock, the owner file and empty folders (a run refused at its
    start leaves only those)."""
    for p in out.iterdir():
        if p.name in IGNORED:
            continue
        if not p.is_dir() or any(q.is_file() for q in p.rglob("*")):
            return True
    return False


def refuse_foreign(out: Path, command: str) -> str | None:
    """A one-line ValueError when the folder holds another command's run, or files `command` writes that no fastmae
    run wrote; else its owner (None: nobody's yet). Writes nothing: commands call it before any work too."""
    if not out.is_dir():
        return None
    owner = folder_command(out)
    theirs = [n for n in OUTPUTS_OF.get(command, ()) if (out / n).exists()] if owner is None else []
    if theirs:
        raise ValueError(f"--run.output_dir {out} holds {theirs[0]}, which no fastmae run wrote there (the folder has "
                         f"no {OWNER_NAME}): `fastmae {command}` would replace it; pass another --run.output_dir")
    if owner is not None and owner != command and _holds_outputs(out):
        raise ValueError(f"--run.output_dir {out} holds a `fastmae {owner}` run (a folder holds one command's run, so "
                         f"none overwrites another's files); pass another --run.output_dir for `fastmae {command}`")
    return owner


def claim(out: Path, command: str) -> None:
    """Make `command` the owner of the (locked) folder, or a one-line ValueError when another command's run is
    there."""
    owner = refuse_foreign(out, command)
    if owner != command or not (out / OWNER_NAME).exists():
        atomic_write_text(json.dumps({"command": command}) + "\n", out / OWNER_NAME)
