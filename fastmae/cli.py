"""`fastmae {pretrain, finetune, linprobe, knn, visualize, convert, bench, embed, segment}`: one subcommand per
config dataclass.

Flags and --help come from the dataclass fields (tyro); a command's module is imported only when run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import tyro

from .checkpoint import DiskFullError
from .config import (
    BenchConfig,
    ConvertConfig,
    EmbedConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    PretrainConfig,
    SegmentConfig,
    VisualizeConfig,
)
from .dist import cleanup
from .engine import NonFiniteLossError
from .runlock import release_all

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "fastmae.pretrain:run_pretrain"),
    "finetune": (FinetuneConfig, "fastmae.finetune:run_finetune"),
    "linprobe": (LinprobeConfig, "fastmae.evaluate:run_linprobe"),
    "knn": (KnnConfig, "fastmae.evaluate:run_knn"),
    "visualize": (VisualizeConfig, "fastmae.visualize:run_visualize"),
    "convert": (ConvertConfig, "fastmae.convert:convert_from_config"),
    "bench": (BenchConfig, "fastmae.bench.command:run_bench"),
    "embed": (EmbedConfig, "fastmae.embed:run_embed"),
    "segment": (SegmentConfig, "fastmae.segment:run_segment"),
}


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation (CPU or GPU): a size a user asked for, not a bug."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        "can't allocate memory" in text or "CUDA out of memory" in text or "DefaultCPUAllocator" in text)


def recipe_named(args: Sequence[str]) -> str:
    """The value of --recipe among a command's arguments ('' when absent)."""
    for i, a in enumerate(args):
        if a == "--recipe" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--recipe="):
            return a.split("=", 1)[1]
    return ""


def parse(argv: Sequence[str] | None) -> object:
    """argv -> the command's config. With --recipe NAME the recipe's config is the default every flag overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = recipe_named(args[1:]) if args and args[0] in COMMANDS else ""
    if name:
        from .recipes import recipe

        cls = COMMANDS[args[0]][0]
        try:
            default = recipe(args[0], name)
        except ValueError as e:
            print(f"fastmae: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return tyro.cli(cls, default=default, args=args[1:], prog=f"fastmae {args[0]}", use_underscores=True,
                        description=cls.__doc__)
    return tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()},
        prog="fastmae",
        description="Masked autoencoders (MAE) for your own images: pretrain, evaluate, embed, segment, visualize, "
                    "convert, bench.",
        args=args,
        use_underscores=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, turn user errors into one clear line and exit code 2."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # whoever read stdout has gone (`fastmae finetune --help | head`): stop quietly, as a shell tool does,
        # and point stdout at /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: Sequence[str] | None) -> int:
    cfg = parse(argv)  # --help and malformed flags exit here (tyro's message, exit code 2)
    target = next(t for cls, t in COMMANDS.values() if type(cfg) is cls)
    module, fn = target.split(":")
    run = getattr(importlib.import_module(module), fn)
    ok = False
    try:
        run(cfg)
        ok = True
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, NonFiniteLossError,
            DiskFullError) as e:
        if os.environ.get("FASTMAE_DEBUG"):
            raise
        print(f"fastmae: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (MemoryError, RuntimeError) as e:
        if os.environ.get("FASTMAE_DEBUG") or not is_out_of_memory(e):
            raise
        print(f"fastmae: error: out of memory ({str(e).splitlines()[0][:200]}); use a smaller model (--model.*), "
              f"a smaller --optim.batch_size, or a machine with more memory", file=sys.stderr, flush=True)
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
