"""Outputs of the evaluation commands (knn.json, linprobe.json, embed's features, visualize's figures): another run
stops before any work instead of replacing them, unless the user asks for it with the command's overwrite flag."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def refuse_replacing(paths: Iterable[Path], flag: str, where: str = "--run.output_dir") -> None:
    """ValueError naming the first of `paths` that exists (with the result it holds) and the two ways on: another
    `where` (the flag that names the output) or `flag` (the command's overwrite flag)."""
    for path in paths:
        if path.exists():
            raise ValueError(f"{path} holds an earlier run's output{_summary(path)}; pass another {where} for this "
                             f"run, or {flag} to replace it")


def _summary(path: Path) -> str:
    """' (top-1 87.49% of runs/pretrain)' from a result JSON that has those keys; '' otherwise."""
    if path.suffix != ".json":
        return ""
    try:
        result = json.loads(path.read_text())
        return f" (top-1 {float(result['top1']):.2f}% of {result['init']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
