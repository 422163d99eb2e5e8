"""Outputs of the evaluation commands (knn.json, linprobe.json, embed's features, visualize's figures): another run
stops before any work instead of replacing them, unless the user asks for it with the command's overwrite flag;
a result is written with the config.json of the run that produced it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..config import DataConfig
from ..data import eval_split_name
from ..weights.checkpoint import atomic_write_text
from .dist import print0
from .runtime import Runtime
from .trainer import write_config


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


def report_result(rt: Runtime, name: str, what: str, result: dict, data_cfg: DataConfig) -> None:
    """Rank 0 writes `<name>.json` and the config.json of the run that produced it (atomically) and prints
    `<what>: top-1 a%  top-5 b% on the <split> (<file>)`."""
    if not rt.dist.is_main:
        return
    path = rt.out_dir / f"{name}.json"
    write_config(rt)
    atomic_write_text(json.dumps(result, indent=2, sort_keys=True), path)
    print0(rt.dist, f"{what}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}% on the "
                    f"{eval_split_name(data_cfg)} ({path})")
