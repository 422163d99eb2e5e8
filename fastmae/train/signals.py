"""Stop signals (SIGTERM, SIGUSR1: preemption, Slurm's warning): a flag the training loop polls, and an exception
everywhere else.

Inside `trainer.fit` a signal only sets a StopFlag; the loop saves a checkpoint at the next safe point and the
command returns. Outside it (loading data, a final evaluation, writing results) there is no safe point to wait for,
so `raising()` turns the signal into `Stopped` at once: `atomic_write` removes its temporary file, `convert` the
files it had written, and the CLI says what was kept and exits 128 + the signal number. An epoch-end evaluation
(kNN, AP) inside fit is interrupted the same way (`StopFlag.interrupting`), so a stop never waits for it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """A stop signal arrived where no loop polls for one: the work in progress is abandoned."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _raise(signum, frame) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """Within: SIGTERM / SIGUSR1 raise Stopped in the main thread (elsewhere, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}
        self._raise = False  # inside interrupting(): the handler raises Stopped too

    def __call__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def describe(self) -> str:
        """'signal 15' on the rank that got it, else 'a signal on another rank' (the ranks agreed to stop)."""
        return f"signal {self.signal}" if self.signal is not None else "a stop signal on another rank"

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self._raise:
            self._raise = False  # once: the code that catches it must not be interrupted in turn
            raise Stopped(signum)

    @contextlib.contextmanager
    def interrupting(self, enabled: bool = True) -> Iterator[None]:
        """Within: a stop signal (or one already received) raises Stopped, for work the loop cannot poll (an
        epoch-end evaluation). enabled=False (a DDP job, whose ranks must leave their collectives together): a
        signal only sets the flag."""
        if not enabled:
            yield
            return
        if self.signal is not None:
            raise Stopped(self.signal)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
