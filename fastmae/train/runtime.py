"""What one run is made of once set up (`Runtime`) and where it stands (`Progress`): shared by the loop and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from .dist import DistInfo
from .log import RunLogger


@dataclass
class Runtime:
    """Resolved device, precision, process group, output folder and logger of one run."""

    device: torch.device
    precision: str  # 'bf16', 'fp16' or 'fp32'
    precision_label: str  # for the startup line: 'fp32 (no native bf16 on this CPU)' when auto fell back
    dist: DistInfo
    out_dir: Path
    logger: RunLogger
    run: RunConfig
    config: dict = field(default_factory=dict)  # the command's resolved config, written as config.json
    lock: Path | None = None  # the run folder's lock (rank 0), released when the command exits


@dataclass
class Progress:
    epoch: int = 0  # epoch to run next
    batch: int = 0  # batch index inside that epoch to start from
    resumed_from: str = ""
    extra: dict = field(default_factory=dict)  # command-specific state (e.g. best accuracy)
    loss_sum: float = 0.0  # this rank's running loss sum of the unfinished epoch (float32 value), for its mean
    loss_count: int = 0  # batches in loss_sum
    steps_per_epoch: int = 0  # batches per epoch of this run's loader (recorded in checkpoints)
    resumed_at: tuple[int, int] = (0, 0)  # (epoch, batch) this process started from


def position(epoch: int, batch: int) -> str:
    """Where a run stands, for a person: 'after epoch 21' at an epoch's end, 'in epoch 22 after batch 651' mid-way
    (epochs counted from 1, as in the epoch lines)."""
    if batch:
        return f"in epoch {epoch + 1} after batch {batch}"
    return f"after epoch {epoch}" if epoch else "at the start"


def duration(seconds: float, prog: Progress) -> str:
    """This process's wall time, saying so when the run was resumed: '3809 s', or '3809 s (since resuming in
    epoch 22 after batch 651)': the earlier part ran in another process."""
    if not prog.resumed_from:
        return f"{seconds:.0f} s"
    return f"{seconds:.0f} s (since resuming {position(*prog.resumed_at)})"
