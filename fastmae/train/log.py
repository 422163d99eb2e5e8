"""Run logging: JSON-lines metrics, TensorBoard scalars on a global-step axis, progress (a tqdm bar on a terminal,
periodic plain lines in a log file)."""

from __future__ import annotations

import errno
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes `log.jsonl` (one JSON object per epoch/event) and TensorBoard scalars; inert when disabled."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        for path in (self.path, Path(output_dir) / "tensorboard"):
            wrong = path.is_dir() if path == self.path else (path.exists() and not path.is_dir())
            if enabled and wrong:  # refused before training, not by an OSError after the first epoch
                raise ValueError(f"{path} is a {'folder' if path.is_dir() else 'file'} where the run writes its "
                                 f"{'log file' if path == self.path else 'TensorBoard folder'}; move it away or pass "
                                 f"another --run.output_dir")
        self._tb_dir = Path(output_dir) / "tensorboard" if enabled and tensorboard else None
        self._tb = None

    def _writer(self):
        """The SummaryWriter, made at the first scalar (a run refused before training leaves no events file)."""
        if self._tb is None and self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self._tb_dir))
            except Exception as e:  # tensorboard missing or broken: keep training, say so once
                warnings.warn(f"TensorBoard logging disabled: {e}", stacklevel=3)
                self._tb_dir = None
        return self._tb

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """TensorBoard scalars at a global step."""
        tb = self._writer()
        if tb is not None:
            for k, v in values.items():
                tb.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, entry: dict[str, Any]) -> None:
        """Append one JSON line (with a timestamp)."""
        if not self.enabled:
            return
        entry = {"time": round(time.time(), 3), **entry}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                from ..weights.checkpoint import DiskFullError

                raise DiskFullError(f"no space left on device while writing {self.path}; free space or pass "
                                    f"another --run.output_dir") from None
            raise

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class LineProgress:
    """Progress for a log file (nohup, SLURM, CI): one plain line every `interval` seconds and one at the end.

    tqdm redraws with carriage returns several times a second, which in a redirected stream becomes megabytes of
    one unreadable line; this writes whole lines (done/total, elapsed, time left, the latest postfix).
    """

    def __init__(self, iterable, total: int, desc: str = "", initial: int = 0, interval: float = 60.0,
                 stream=None):
        self.iterable, self.total, self.desc, self.initial = iterable, total, desc, initial
        self.interval, self.stream = interval, stream if stream is not None else sys.stderr
        self.postfix: dict[str, str] = {}
        self.n = self._handed = 0  # items finished / handed out (a consumer may break before asking for more)
        self._t0 = self._last = time.monotonic()
        self._t1 = 0.0  # when the first item was done: the rate for the time left leaves out warm-up (compile)
        self._closed = False

    def set_postfix(self, **values: Any) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def __iter__(self):
        for item in self.iterable:
            self._handed += 1
            yield item
            self.n = self._handed
            now = time.monotonic()
            if self.n == 1:
                self._t1 = now
            if now - self._last >= self.interval and self.initial + self.n < self.total:
                self._last = now
                self._write(now)

    def close(self) -> None:
        if not self._closed:
            self._closed, self.n = True, self._handed
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        elapsed = now - self._t0
        done, total = self.initial + self.n, self.total
        if self.n >= 2:
            left = (now - self._t1) / (self.n - 1) * (total - done)
        else:
            left = elapsed / self.n * (total - done) if self.n else 0.0
        parts = [f"{self.desc}: " if self.desc else "", f"{done}/{total} ({100 * done / max(total, 1):.0f}%)",
                 f" {clock(elapsed)} elapsed"]
        if self.n and done < total:
            parts.append(f", ~{clock(left)} left")
        if self.postfix:
            parts.append(", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items()))
        self.stream.write("".join(parts) + "\n")
        self.stream.flush()


def clock(seconds: float) -> str:
    """H:MM:SS or M:SS."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def epoch_line(entry: dict[str, Any], epochs: int, left_s: float = 0.0) -> str:
    """An epoch's log.jsonl entry for a person, with the same keys, and the time the rest of the run needs:
    `epoch 2/30 done: loss 0.99301, lr 0.0005, top1 81.06 | 466 s, 129 img/s, ~3:37:23 left`."""
    timing = ("epoch", "step", "epoch_seconds", "images_per_s", "elapsed_seconds")
    fields = ", ".join(f"{k} {f'{v:.5g}' if isinstance(v, float) else v}" for k, v in entry.items() if k not in timing)
    secs, ips = entry["epoch_seconds"], entry["images_per_s"]
    tail = f"{secs:.0f} s, {ips:.0f} img/s" if ips >= 10 else f"{secs:.1f} s, {ips:.2g} img/s"  # tiny runs: digits
    if left_s > 0:
        tail += f", ~{clock(left_s)} left"
    return f"epoch {entry['epoch']}/{epochs} done: {fields} | {tail}"


def run_time_left(walls: list[tuple[float, int]], batches_left: int) -> float:
    """Seconds the rest of a run needs, from this process's epochs as (wall seconds, batches run): per batch,
    so an epoch resumed mid-way counts for its part; once there are two, the first (torch.compile's warm-up,
    the resume) is left out."""
    timed = walls[1:] if len(walls) > 1 else walls
    batches = sum(b for _, b in timed)
    return sum(s for s, _ in timed) / batches * batches_left if batches else 0.0


def progress(iterable, total: int, enabled: bool, desc: str = "", initial: int = 0, stream=None):
    """Rank 0's progress when enabled (a tqdm bar on a terminal, LineProgress otherwise); the bare iterable if not."""
    if not enabled:
        return iterable
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty is not None and isatty()):
        return LineProgress(iterable, total=total, desc=desc, initial=initial, stream=stream)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False, file=stream)
