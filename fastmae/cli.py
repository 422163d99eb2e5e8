"""`fastmae {pretrain, finetune, linprobe, knn, visualize, convert, segment}`: one subcommand per config dataclass.

Flags and --help come from the dataclass fields (tyro); a command's module is imported only when run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import tyro

from .config import (
    ConvertConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    PretrainConfig,
    SegmentConfig,
    VisualizeConfig,
)
from .dist import cleanup
from .engine import NonFiniteLossError

COMMANDS: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "fastmae.pretrain:run_pretrain"),
    "finetune": (FinetuneConfig, "fastmae.finetune:run_finetune"),
    "linprobe": (LinprobeConfig, "fastmae.evaluate:run_linprobe"),
    "knn": (KnnConfig, "fastmae.evaluate:run_knn"),
    "visualize": (VisualizeConfig, "fastmae.visualize:run_visualize"),
    "convert": (ConvertConfig, "fastmae.convert:convert_from_config"),
    "segment": (SegmentConfig, "fastmae.segment:run_segment"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, turn user errors into one clear line and exit code 2."""
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in COMMANDS.items()},
        prog="fastmae",
        description="Masked autoencoders (MAE) for your own images: pretrain, evaluate, visualize, convert.",
        args=argv,
        use_underscores=True,
    )
    target = next(t for cls, t in COMMANDS.values() if type(cfg) is cls)
    module, fn = target.split(":")
    run = getattr(importlib.import_module(module), fn)
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, NonFiniteLossError) as e:
        if os.environ.get("FASTMAE_DEBUG"):
            raise
        print(f"fastmae: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("fastmae: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
