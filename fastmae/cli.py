"""`fastmae {pretrain, finetune, linprobe, knn, visualize, convert, bench, embed, segment, detect, pose, shard, predict, export}`: one
subcommand per config dataclass.

Flags and --help come from the dataclass fields (tyro), so every command's config class is imported here; its run
function is looked up by name when the command runs. The dense tasks come from their registry (fastmae/tasks.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import tyro

from .commands.bench import BenchConfig
from .commands.convert import ConvertConfig
from .commands.embed import EmbedConfig
from .commands.export import ExportConfig
from .commands.finetune import FinetuneConfig
from .commands.knn import KnnConfig
from .commands.linprobe import LinprobeConfig
from .commands.predict import PredictConfig
from .commands.pretrain import PretrainConfig
from .commands.shard import ShardConfig
from .commands.visualize import VisualizeConfig
from .flags import check_command_line
from .tasks import DENSE_TASKS
from .train.dist import cleanup
from .train.engine import NonFiniteLossError
from .train.runlock import release_all
from .train.signals import Stopped, raising
from .weights.checkpoint import DiskFullError

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "fastmae.commands.pretrain:run_pretrain"),
    "finetune": (FinetuneConfig, "fastmae.commands.finetune:run_finetune"),
    "linprobe": (LinprobeConfig, "fastmae.commands.linprobe:run_linprobe"),
    "knn": (KnnConfig, "fastmae.commands.knn:run_knn"),
    "visualize": (VisualizeConfig, "fastmae.commands.visualize:run_visualize"),
    "convert": (ConvertConfig, "fastmae.commands.convert:convert_from_config"),
    "bench": (BenchConfig, "fastmae.commands.bench:run_bench"),
    "embed": (EmbedConfig, "fastmae.commands.embed:run_embed"),
    **{row.command: (getattr(importlib.import_module(row.module), row.config), f"{row.module}:{row.runner}")
       for row in DENSE_TASKS},
    "shard": (ShardConfig, "fastmae.commands.shard:run_shard"),
    "predict": (PredictConfig, "fastmae.commands.predict:run_predict"),
    "export": (ExportConfig, "fastmae.commands.export:run_export"),
}


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation (CPU or GPU): a size a user asked for, not a bug."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        "can't allocate memory" in text or "CUDA out of memory" in text or "DefaultCPUAllocator" in text)


def debugging() -> bool:
    """FASTMAE_DEBUG set to 1/true/yes/on shows tracebacks; unset, empty, 0/false/no/off does not."""
    return os.environ.get("FASTMAE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def recipes_named(args: Sequence[str]) -> list[str]:
    """Every value of --recipe among a command's arguments, in order."""
    out = []
    for i, a in enumerate(args):
        if a == "--recipe" and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--recipe="):
            out.append(a.split("=", 1)[1])
    return out


def recipe_named(args: Sequence[str]) -> str:
    """The value of --recipe among a command's arguments ('' when absent)."""
    return (recipes_named(args) or [""])[0]


def parse(argv: Sequence[str] | None) -> object:
    """argv -> the command's config. With --recipe NAME the recipe's config is the default every flag overrides.

    The line is checked against the commands' flags first (flags.check_command_line): a malformed one ends in one
    `fastmae: error: ...` line and exit code 2. --help goes to tyro untouched.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args and args[0] in COMMANDS else ""
    named = recipes_named(args[1:]) if command else []
    if len(named) > 1:  # tyro would keep the last for config.json while the first chose the defaults
        _fail(f"--recipe is given {len(named)} times ({', '.join(named)}); a run starts from one recipe: give one")
    name = named[0] if named else ""
    if name:
        from .recipes import recipe

        try:
            default = recipe(command, name)
        except ValueError as e:
            _fail(str(e))
    asks_help = any(a in ("-h", "--help") for a in args)
    if not asks_help or (args[0] not in COMMANDS and not args[0].startswith("-")):  # help: only the command name
        problem = check_command_line(args, {n: cls for n, (cls, _) in COMMANDS.items()})
        if problem:
            _fail(problem)
    quiet = not asks_help  # errors are ours; tyro prints only help
    try:
        if name:
            cls = COMMANDS[command][0]
            return tyro.cli(cls, default=default, args=args[1:], prog=f"fastmae {command}", use_underscores=True,
                            description=cls.__doc__, console_outputs=not quiet)
        return tyro.extras.subcommand_cli_from_dict(
            {n: cls for n, (cls, _) in COMMANDS.items()},
            prog="fastmae",
            description="Masked autoencoders (MAE) for your own images: pretrain, evaluate, embed, segment, "
                        "detect, pose, visualize, convert, bench, shard.",
            args=args,
            use_underscores=True,
            console_outputs=not quiet,
        )
    except SystemExit as e:  # a line the check passed but tyro refused: no words of tyro's to show
        if e.code not in (0, None) and quiet:
            _fail(f"the command line was not understood; see `fastmae {command} --help`")  # checked: a command
        raise


def _fail(problem: str):
    print(f"fastmae: error: {problem}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, turn user errors into one clear line and exit code 2."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read stdout has gone (`fastmae finetune --help | head`): stop quietly, as a shell tool does,
        # and point stdout at /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def stop_in_chain(e: BaseException) -> Stopped | None:
    """The Stopped among an exception's causes: a signal during `import matplotlib` surfaces as 'ImportError:
    initialization failed' caused by it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Stopped):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _main(argv: Sequence[str] | None) -> int:
    cfg = parse(argv)  # --help exits here (0), a malformed command line too (one error line, exit code 2)
    target = next(t for cls, t in COMMANDS.values() if type(cfg) is cls)
    module, fn = target.split(":")
    run = getattr(importlib.import_module(module), fn)
    ok = False
    try:
        try:
            with raising():  # a stop signal outside the training loop ends the command at once (see train.signals)
                run(cfg)
        except Exception as e:  # a stop raised inside an import or a C extension arrives wrapped (ImportError ...)
            stop = stop_in_chain(e)
            if stop is None:
                raise
            raise stop from None
        ok = True
    except Stopped as e:
        print(f"fastmae: stopped by signal {e.signum} before the command finished; the checkpoints and files it had "
              f"finished are kept, none half-written: run the same command again to go on", file=sys.stderr,
              flush=True)
        return 128 + e.signum
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, NonFiniteLossError,
            DiskFullError) as e:
        if debugging():
            raise
        print(f"fastmae: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (MemoryError, RuntimeError) as e:
        if debugging() or not is_out_of_memory(e):
            raise
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # a bare MemoryError() says nothing
        print(f"fastmae: error: out of memory ({said}); use a smaller model (--model.*), a smaller "
              f"--optim.batch_size, or a machine with more memory", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all()
        cleanup(wait_for_all=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
