"""The learning-curve figure of a run: loss and kNN top-1 per epoch from its log.jsonl, as a PNG beside it.

Users would rather look than read: `fastmae pretrain` writes `learning_curve.png` at the end of a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import atomic_write


def epoch_entries(log_path: str | Path) -> list[dict]:
    """The per-epoch lines of a log.jsonl (events such as preemption skipped), last one per epoch kept.

    A resumed run logs the epochs after its restart again; a line that does not parse (a torn write) is skipped.
    """
    by_epoch: dict[int, dict] = {}
    for line in Path(log_path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "epoch" in entry and "loss" in entry and "event" not in entry:
            by_epoch[int(entry["epoch"])] = entry
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_learning_curve(log_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """Write loss (left axis) and kNN top-1 (right axis, where measured) per epoch; None when no epoch is logged."""
    entries = epoch_entries(log_path)
    if not entries:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in entries]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(epochs, [e["loss"] for e in entries], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("loss (MSE on masked patches)", color="tab:blue")
    knn = [(e["epoch"], e["knn_top1"]) for e in entries if "knn_top1" in e]
    if knn:
        ax2 = ax.twinx()
        ax2.plot(*zip(*knn), "s-", color="tab:orange", label="kNN top-1")
        ax2.set_ylabel("kNN top-1 (%)", color="tab:orange")
    ax.set_title(title or "learning curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return out
