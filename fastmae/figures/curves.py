"""The learning-curve figure of a run: loss and kNN or evaluation top-1 per epoch from its log.jsonl, as a PNG beside it.

Users would rather look than read: `fastmae pretrain` and `fastmae finetune` write `learning_curve.png` at the
end of a run; `plot_runs` puts several runs' curves on one axis (docs/finetune_curves.png).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..weights.checkpoint import atomic_write


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


# the per-epoch metric of each command's log, as (log key, axis label)
PRETRAIN_METRIC = ("knn_top1", "kNN top-1 (%)")
FINETUNE_METRIC = ("top1", "top-1 (%)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_path: str | Path) -> Path:
    out = Path(out_path)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    _pyplot().close(fig)
    return out


def plot_learning_curve(log_path: str | Path, out_path: str | Path, title: str = "",
                        loss_label: str = "loss (MSE on masked patches)",
                        metric: tuple[str, str] = PRETRAIN_METRIC) -> Path | None:
    """Write loss (left axis) and the run's metric (right axis, where measured) per epoch, and beside it the metric
    against the run's wall-clock minutes (log.jsonl's elapsed_seconds) where logged; None when no epoch is logged.
    Pretraining plots kNN top-1, fine-tuning evaluation top-1 (`metric=FINETUNE_METRIC`)."""
    entries = epoch_entries(log_path)
    if not entries:
        return None
    import matplotlib.ticker

    plt = _pyplot()
    epochs = [e["epoch"] for e in entries]
    key, label = metric
    timed = [(e["elapsed_seconds"] / 60, e[key]) for e in entries if key in e and "elapsed_seconds" in e]
    if timed:  # the metric against the run's wall-clock time too: its time to accuracy
        fig, (ax, at) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
        at.plot(*zip(*timed), "s-", color="tab:orange")
        at.set_xlabel("wall-clock minutes (training + evaluation)")
        at.set_ylabel(label, color="tab:orange")
        at.set_title("against time")
        at.grid(alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(epochs, [e["loss"] for e in entries], "o-", color="tab:blue", label="training loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(loss_label, color="tab:blue")
    points = [(e["epoch"], e[key]) for e in entries if key in e]
    if points:
        ax2 = ax.twinx()
        ax2.plot(*zip(*points), "s-", color="tab:orange", label=label)
        ax2.set_ylabel(label, color="tab:orange")
    ax.set_title(title or "learning curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def spread(heights: list[float], gap: float) -> list[float]:
    """Label heights at least `gap` apart, each as near its own height as that allows (in input order): labels of
    curves that end at nearly the same value are stacked around their mean instead of printed over each other."""
    groups: list[list[int]] = []  # labels pushed together, lowest first, each group centred on its mean height
    for i in sorted(range(len(heights)), key=lambda i: heights[i]):
        groups.append([i])
        while len(groups) > 1 and _start(groups[-2], heights, gap) + len(groups[-2]) * gap > _start(
                groups[-1], heights, gap):
            groups[-2:] = [groups[-2] + groups[-1]]  # they overlap: one stack
    out = [0.0] * len(heights)
    for g in groups:
        for k, i in enumerate(g):
            out[i] = _start(g, heights, gap) + k * gap
    return out


def _start(group: list[int], heights: list[float], gap: float) -> float:
    """The lowest height of a group stacked `gap` apart and centred on its members' mean height."""
    return sum(heights[i] for i in group) / len(group) - (len(group) - 1) * gap / 2


def plot_runs(logs: dict[str, str | Path], out_path: str | Path, title: str = "",
              metric: tuple[str, str] = FINETUNE_METRIC) -> Path:
    """One curve per run (label -> log.jsonl) of a metric per epoch on one axis, e.g. fine-tuning top-1 from MAE
    against from random init; the last value is written beside each curve. ValueError if a run logged none."""
    plt = _pyplot()
    import matplotlib.ticker

    key, label = metric
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    ends = []  # (last point, colour) of each curve
    for name, log in logs.items():
        points = [(e["epoch"], e[key]) for e in epoch_entries(log) if key in e]
        if not points:
            plt.close(fig)
            raise ValueError(f"{log} has no epoch with {key!r}: is it the log.jsonl of a finished epoch?")
        line, = ax.plot(*zip(*points), "o-", ms=3, label=name)
        ends.append((points[-1], line.get_color()))
    ax.margins(x=0.1)  # room for the last values
    ax.autoscale_view()
    at = [float(ax.transData.transform(p)[1]) * 72 / fig.dpi for p, _ in ends]  # heights in points
    for (p, colour), y, y_label in zip(ends, at, spread(at, 9.0)):  # last values that do not overlap
        ax.annotate(f"{p[1]:.2f}", p, textcoords="offset points", xytext=(4, y_label - y - 3), color=colour,
                    fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(label)
    ax.set_title(title or label, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, out_path)
