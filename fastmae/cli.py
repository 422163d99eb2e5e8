"""`fastmae {pretrain, ...}`: one subcommand per config dataclass; flags and --help come from the fields."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import tyro

from .config import PretrainConfig
from .engine import NonFiniteLossError


def _commands() -> dict[str, tuple[type, Callable]]:
    from .pretrain import run_pretrain

    return {
        "pretrain": (PretrainConfig, run_pretrain),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, turn user errors into one clear line and exit code 2."""
    commands = _commands()
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: cls for name, (cls, _) in commands.items()},
        prog="fastmae",
        description="Masked autoencoders (MAE) for your own images: pretrain, evaluate, visualize, convert.",
        args=argv,
        use_underscores=True,
    )
    run = next(fn for cls, fn in commands.values() if isinstance(cfg, cls))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
