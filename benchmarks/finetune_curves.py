"""Fine-tuning curves side by side: top-1 per epoch of finished `fastmae finetune` runs, as a figure and a table.

The runs behind BENCHMARKS.md's "Fine-tuning curves" (the fmnist-small recipe from the default pretraining run and
from random init; two 1-thread processes side by side on a 2-core CPU train ~1.27x faster in total than one
2-thread run after the other):

    fastmae finetune --recipe fmnist-small --init runs/pretrain --run.output_dir runs/ft_mae --run.num_threads 1 &
    fastmae finetune --recipe fmnist-small --init random --run.output_dir runs/ft_random --run.num_threads 1 &
    wait
    python benchmarks/finetune_curves.py MAE=runs/ft_mae random=runs/ft_random --out docs/finetune_curves.png

Each epoch's top-1 is on the whole evaluation split (Fashion-MNIST: the 10,000 test images); the number to quote
is the last epoch's, not the best, which would be chosen on the test set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmae.figures.curves import FINETUNE_METRIC, epoch_entries, plot_runs


def table(runs: dict[str, Path]) -> str:
    """Markdown: one row per epoch, one top-1 column per run, then each run's epoch seconds (median)."""
    curves = {name: {e["epoch"]: e for e in epoch_entries(path / "log.jsonl")} for name, path in runs.items()}
    epochs = sorted(set().union(*curves.values()))
    lines = ["| epoch | " + " | ".join(f"{n} top-1" for n in runs) + " |",
             "| ---: | " + " | ".join("---:" for _ in runs) + " |"]
    for ep in epochs:
        cells = [f"{c[ep]['top1']:.2f}" if ep in c and "top1" in c[ep] else "" for c in curves.values()]
        lines.append(f"| {ep} | " + " | ".join(cells) + " |")
    secs = []
    for name, c in curves.items():
        s = sorted(e["epoch_seconds"] for e in c.values() if "epoch_seconds" in e)
        if s:
            secs.append(f"{name} {s[len(s) // 2]:.0f} s/epoch")
    return "\n".join(lines) + ("\n\n" + ", ".join(secs) if secs else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR of finished fastmae finetune runs")
    p.add_argument("--out", default="docs/finetune_curves.png", help="figure path")
    p.add_argument("--title", default="fmnist-small fine-tuning: top-1 on the 10,000 Fashion-MNIST test images")
    args = p.parse_args(argv)
    runs: dict[str, Path] = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not (Path(path) / "log.jsonl").is_file():
            p.error(f"{item!r}: give LABEL=RUN_DIR where RUN_DIR holds a fine-tuning log.jsonl")
        runs[label] = Path(path)
    out = plot_runs({n: d / "log.jsonl" for n, d in runs.items()}, args.out, args.title, FINETUNE_METRIC)
    print(table(runs))
    print(f"\nfigure {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
