"""Run logging: JSON-lines metrics, TensorBoard scalars on a global-step axis, a tqdm progress bar."""

from __future__ import annotations

import errno
import json
import time
import warnings
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes `log.jsonl` (one JSON object per epoch/event) and TensorBoard scalars; inert when disabled."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except Exception as e:  # tensorboard missing or broken: keep training, say so once
                warnings.warn(f"TensorBoard logging disabled: {e}", stacklevel=2)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        """TensorBoard scalars at a global step."""
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

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
                from .checkpoint import DiskFullError

                raise DiskFullError(f"no space left on device while writing {self.path}; free space or pass "
                                    f"another --run.output_dir") from None
            raise

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def progress(iterable, total: int, enabled: bool, desc: str = "", initial: int = 0):
    """A tqdm bar on rank 0 when enabled, the bare iterable otherwise."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, leave=False)
