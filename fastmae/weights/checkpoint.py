"""Checkpoints: state dicts loadable with weights_only=True plus a JSON of metadata, written atomically.

A training checkpoint `checkpoint-{step:08d}.pt` holds {'model', 'optimizer', 'scaler', 'epoch', 'batch',
'step', 'rng'}: tensors and plain Python values only, never configs or code objects. Its metadata
(`.json` beside it) holds the model kind and constructor kwargs, the resolved config and progress.
Every file is written to a temporary name in the same folder, fsynced, then renamed, so a crash
never leaves a half-written checkpoint and the previous one stays loadable.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

CKPT_RE = re.compile(r"^checkpoint-(\d{8})\.pt$")


def safe_join(folder: str | Path, name: str | Path, what: str = "name") -> Path:
    """folder / name, or a ValueError when name would land outside folder (absolute, or climbing with '..').

    For names that come from user input or from a file's content (a shard list, metadata): they may
    never write or read outside their folder; the folder itself can be anywhere. The check is on the
    name's text, so symlinks inside the folder still work (a Hugging Face cache folder is made of them).
    """
    rel = Path(name)
    if str(name) in ("", ".") or rel.is_absolute() or rel.anchor or ".." in rel.parts:
        raise ValueError(
            f"refusing {what} {str(name)!r}: it points outside the folder {folder}; "
            f"only relative names without '..' are allowed there"
        )
    return Path(folder) / rel


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC/EDQUOT); the message names the file and the fix, for one CLI line."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def atomic_write(path: str | Path, write: Callable[[Path], None],
                 disk_full_fix: str = "free space or pass another --run.output_dir") -> Path:
    """write(tmp) to a temporary file beside `path`, fsync, then rename: a crash never leaves half a file.

    The file gets the mode a plain open() would give (0o666 minus the umask), not mkstemp's 0o600.
    A full disk raises DiskFullError naming the file and disk_full_fix; the previous file at `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e, path.parent):
            raise DiskFullError(f"no space left on device while writing {path}; {disk_full_fix}") from None
        raise
    return path


# what torch.save's C++ writer says when a write comes up short: 'file write failed', or (zip records written past a
# failed write) '[enforce fail at inline_container.cc] . unexpected pos 4096 vs 4020'
_SHORT_WRITE = ("No space left on device", "write failed", "unexpected pos")


def _is_disk_full(e: BaseException | None, folder: Path) -> bool:
    """ENOSPC/EDQUOT, raised directly or wrapped by torch.save: its C++ writer does not say why a write came up
    short, so such a failure in a folder whose filesystem has (almost) no space left counts as a full disk too."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in _SHORT_WRITE):
            try:
                return shutil.disk_usage(folder).free < 64 * 2**20
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save, atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def rng_state() -> dict:
    """RNG states that a resumed run must restore to continue bit-for-bit (torch CPU/CUDA, Python)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Training checkpoints in a folder, oldest first: by the (epoch, batch) their .json records, then the step.

    Not by name alone: a run resumed with fewer batches per epoch (more processes, less data) numbers its
    steps lower than the checkpoints it continues, and the newest must still come last.
    """
    return [p for _, p in _keyed_checkpoints(output_dir)]


def _keyed_checkpoints(output_dir: str | Path) -> list[tuple[tuple[int, int, int], Path]]:
    """(progress key, path) of the training checkpoints in a folder, oldest first (each .json read once)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted((_progress_key(p), p) for p in d.iterdir() if CKPT_RE.match(p.name))


def _progress_key(path: Path) -> tuple[int, int, int]:
    """(epoch, batch, step) of a checkpoint from its .json (a file without one sorts by its step alone, first)."""
    step = int(CKPT_RE.match(path.name).group(1))
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        return int(meta["epoch"]), int(meta.get("batch", 0)), step
    except (OSError, ValueError, KeyError, TypeError):
        return -1, 0, step


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest training checkpoint in a folder, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_number(output_dir: str | Path, state: dict, existing: list | None = None) -> int:
    """The number in the name of the checkpoint `state` is saved as: its global step, unless an older checkpoint of
    the run already has that number (then the next free number above all; the state's own 'step' is unchanged);
    the same training point saved again keeps its number. existing: the folder's `_keyed_checkpoints`, if read."""
    existing = _keyed_checkpoints(output_dir) if existing is None else existing
    progress = (int(state["epoch"]), int(state.get("batch", 0)))
    number = int(state["step"])
    same = [key[2] for key, _ in existing if key[:2] == progress]
    if same:
        return same[-1]  # this training point saved again (e.g. a stop right after an epoch's checkpoint)
    if number in {key[2] for key, _ in existing}:  # an older checkpoint has this number (batches per epoch changed)
        return max(key[2] for key, _ in existing) + 1
    return number


def save_checkpoint(output_dir: str | Path, state: dict, meta: dict, keep_last: int = 0,
                    sharded_tmp: Path | None = None) -> Path:
    """Write checkpoint-{number}.pt and its .json atomically; then prune older ones beyond keep_last.

    sharded_tmp: a finished DCP folder of the model and optimizer (weights/sharded.py), moved to checkpoint-N.dcp
    first; the .pt then holds the rest and names it. Temp files a killed writer left behind are removed first (only
    rank 0 writes into a run folder).
    """
    existing = _keyed_checkpoints(output_dir)
    progress = (int(state["epoch"]), int(state.get("batch", 0)))
    number = checkpoint_number(output_dir, state, existing)
    path = checkpoint_path(output_dir, number)
    for stale in Path(output_dir).glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)
    if sharded_tmp is not None:
        from .sharded import dcp_folder, replace_folder

        replace_folder(sharded_tmp, dcp_folder(path))
        state = {**state, "sharded": dcp_folder(path).name}
    atomic_save(state, path)
    meta = {**meta, "step": int(state["step"]), "epoch": int(state["epoch"]), "batch": int(state.get("batch", 0)),
            "saved_at": time.time()}
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True), path.with_suffix(".json"))
    if keep_last > 0:
        after = sorted([(key, p) for key, p in existing if p != path] + [((*progress, number), path)])
        for _, old in after[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(".dcp"), ignore_errors=True)
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (its newest checkpoint); clear errors when there is none."""
    p = Path(path)
    if p.is_dir():
        latest = find_latest(p)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint-*.pt in folder {p}; pass a checkpoint file or a run folder")
        return latest
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def _check_torch_format(path: str | Path) -> None:
    """A torch.save file is a zip archive (PyTorch >= 1.6) or a pickle (protocol byte 0x80); say what else it is."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return
    if not head:
        what = "the file is empty"
    elif head.lstrip()[:1] in (b"{", b"["):
        what = "it is JSON text"
    elif all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        what = "it is text"
    else:
        what = f"it starts with bytes {head[:8].hex(' ')}"
    raise ValueError(f"{path} is not a PyTorch checkpoint ({what}); pass a checkpoint (.pt/.pth), a .safetensors "
                     f"file, a Hugging Face folder or a run folder")


def torch_load(path: str | Path) -> Any:
    """torch.load with weights_only=True only: a pickle that needs code is refused, never executed."""
    _check_torch_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights only" not in str(e).lower() and "weights_only" not in str(e):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {first}") from None
        raise ValueError(
            f"{path} contains pickled Python objects besides tensors, which fastmae will not execute "
            f"(unpickling them could run arbitrary code; torch.load(weights_only=True) refused: {first}). "
            f"If you trust the file and its source, unpickle it yourself in a separate session (weights_only "
            f"off) and re-save only the weights: torch.save(ckpt['model'], 'weights.pth'), or "
            f"safetensors.torch.save_file(ckpt['model'], 'weights.safetensors')."
        ) from None
    except (RuntimeError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first.split(". This is an internal")[0]  # torch's paragraph on what corrupts a file: ours follows
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first}); it may be truncated: copy or write "
                         f"it again from its source, or pass another file") from None


def sharded_folder(path: str | Path, state: Any) -> Path | None:
    """The DCP folder a training checkpoint file's state names ('sharded', beside the file), or None."""
    if not (isinstance(state, dict) and isinstance(state.get("sharded"), str)):
        return None
    return safe_join(Path(path).parent, state["sharded"], what="sharded checkpoint")


def read_training_file(path: Path, with_model: bool = True) -> Any:
    """torch_load, with the whole model of a sharded checkpoint under 'model' (its DCP folder read in this
    process)."""
    state = torch_load(path)
    folder = sharded_folder(path, state)
    if with_model and folder is not None and "model" not in state:
        from .sharded import read_full_model

        state["model"] = read_full_model(folder)
    return state


def load_checkpoint(path: str | Path, with_model: bool = True) -> tuple[dict, dict]:
    """(state, meta) of a training checkpoint file or run folder; meta is {} when the .json is absent.

    A sharded checkpoint (--run.parallel fsdp) gets its whole model under 'model' unless with_model is False (the
    resume loads it sharded instead)."""
    p = resolve(path)
    state = read_training_file(p, with_model)
    meta_path = p.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}, the metadata of checkpoint {p}, is not valid JSON ({e}); restore it from the "
                         f"run it came with, or remove it to read the weights without it") from None
    return state, meta


def key_list(keys: Sequence[str], limit: int = 8) -> str:
    """'a', 'b', 'c' ... and N more: for error messages."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
    source_names: Mapping[str, str] | None = None, advice: Callable[[list[str]], str] | str = "",
) -> None:
    """Raise one ValueError naming shape mismatches, missing and unexpected keys of `sd` against the
    expected {name: shape} of a model, before anything loads strictly.

    source_names maps a fastmae key to the checkpoint's own name for it, to name both in the message;
    advice is the fix to suggest (or a function of the missing keys that returns it).
    """
    aka = source_names or {}
    named = lambda k: f"{k!r}" + (f" ({aka[k]!r} in the checkpoint)" if k in aka else "")  # noqa: E731
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{named(k)} is {tuple(sd[k].shape)} in the checkpoint but {tuple(expected[k])} in the model"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    problems = []
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if missing:
        problems.append(f"missing keys {key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {key_list(unexpected)}")
    if problems:
        fix = advice(missing) if callable(advice) else advice
        raise ValueError(f"state dict does not fit {what}: " + " | ".join(problems) + (f". {fix}" if fix else ""))
