"""One writer per run folder: a pid file `.fastmae.lock`, taken by rank 0 before anything is written.

Two runs in one output folder would overwrite each other's checkpoints and log while both exit 0. The lock
file holds the owner's pid, host and process start time, and its holder touches it every HEARTBEAT_S seconds.
A lock is stale, and taken over, when on this host its process is gone or the pid now belongs to another
process (another start time), or, on any host (a preempted job resumed on another node), when it has not been
touched for STALE_AFTER_S seconds. A run that finds a recent lock of another host waits for it (saying so once,
with the time left) instead of failing: a job requeued on another node after its holder was killed goes on by
itself once the lock is stale, while a live holder, whose heartbeat touches the lock, keeps the folder (the
waiting run is refused at the first touch). Creating it with O_EXCL makes the take-over race-free between two
starting runs: only one of them creates the file.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".fastmae.lock"
HEARTBEAT_S = 30.0  # a live holder touches its lock this often
STALE_AFTER_S = 300.0  # a lock untouched this long belongs to no live run, wherever it was taken
POLL_S = 5.0  # how often a run waiting for another host's lock looks at it
_held: dict[Path, int] = {}  # lock path -> pid that took it (a forked child does not own its parent's lock)
_beat: threading.Thread | None = None


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), '' where unknown: with the
    pid it names one process, so a pid reused by another process is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def _heartbeat() -> None:
    """Touch every lock this process holds, every HEARTBEAT_S seconds, for as long as it holds any."""
    while True:
        time.sleep(HEARTBEAT_S)
        for path, pid in list(_held.items()):
            if pid == os.getpid():
                try:
                    os.utime(path)
                except OSError:
                    pass


class RunFolderInUseError(ValueError):
    """Another live fastmae process holds the run folder's lock; a user error (exit 2), not a bug."""


def _owner(path: Path) -> dict | None:
    """The lock's {'pid', 'host', 'start', 'age'}, or None when it is missing or unreadable (a writer killed
    mid-write)."""
    try:
        data = json.loads(path.read_text())
        return {"pid": int(data["pid"]), "host": str(data.get("host", "")), "start": str(data.get("start", "")),
                "age": time.time() - path.stat().st_mtime}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _live(owner: dict, here: bool) -> bool:
    """Whether the lock's run may still be running (see the module docstring)."""
    if owner["age"] > STALE_AFTER_S:
        return False
    if not here:
        return True
    if not _alive(owner["pid"]):
        return False
    return not owner["start"] or owner["start"] == _start_time(owner["pid"])


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a permission error means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_create(path: Path) -> bool:
    """Create the lock file exclusively with our pid and host; False when it already exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}, f)
    return True


def _hold(path: Path) -> Path:
    global _beat
    _held[path] = os.getpid()
    if _beat is None or not _beat.is_alive():
        _beat = threading.Thread(target=_heartbeat, name="fastmae-lock-heartbeat", daemon=True)
        _beat.start()
    return path


def _in_use(folder: str | Path, path: Path, owner: dict, here: bool) -> RunFolderInUseError:
    return RunFolderInUseError(
        f"{folder} is in use by another fastmae run (pid {owner['pid']}"
        f"{'' if here else ' on ' + owner['host']}, lock touched {owner['age']:.0f} s ago); wait for it, or "
        f"pass another --run.output_dir; if no fastmae run uses the folder, remove {path}")


def _wait_for_stale(folder: str | Path, path: Path, owner: dict) -> None:
    """Wait until another host's lock is stale (untouched for STALE_AFTER_S) or gone; RunFolderInUseError as soon
    as it is touched (its holder is alive). Says once what it waits for."""
    try:
        touched = path.stat().st_mtime
    except FileNotFoundError:
        return
    left = STALE_AFTER_S - (time.time() - touched)
    print(f"fastmae: {folder} is locked by pid {owner['pid']} on {owner['host']}, last touched {owner['age']:.0f} s "
          f"ago (a requeued job's killed run?); waiting up to {max(left, 0):.0f} s for the lock to go stale: a live "
          f"run touches it every {HEARTBEAT_S:.0f} s and keeps the folder", flush=True)
    while time.time() - touched <= STALE_AFTER_S:
        time.sleep(min(POLL_S, max(STALE_AFTER_S - (time.time() - touched), 0) + 0.01))
        try:
            now = path.stat().st_mtime
        except FileNotFoundError:
            return  # released
        if now != touched:  # its holder's heartbeat: alive
            current = _owner(path) or owner
            raise _in_use(folder, path, current, False)


def acquire(folder: str | Path) -> Path:
    """Take the lock on `folder` (which exists), taking over a stale one; RunFolderInUseError if it is held.

    The same process may take its own lock again (a second command run in-process, e.g. from Python).
    """
    path = Path(folder) / LOCK_NAME
    for _ in range(3):  # another starter may remove a stale lock between our read and our create
        if _try_create(path):
            return _hold(path)
        owner = _owner(path)
        here = owner is not None and owner["host"] == socket.gethostname()
        if owner is not None and (owner["pid"] == os.getpid() and here):
            return _hold(path)
        if owner is not None and _live(owner, here):
            if here:
                raise _in_use(folder, path, owner, here)
            _wait_for_stale(folder, path, owner)  # another host: its run may be gone (a requeued job)
            if not path.exists():
                continue
        path.unlink(missing_ok=True)  # stale: its process is gone or silent (or the file is unreadable)
    raise RunFolderInUseError(f"{folder} is in use by another fastmae run (its lock {path} keeps reappearing); "
                              f"wait for it, or pass another --run.output_dir")


def release(path: Path | None) -> None:
    """Remove a lock this process holds (a no-op for None or a lock it does not hold)."""
    if path is None or _held.get(path) != os.getpid():
        return
    _held.pop(path, None)
    owner = _owner(path)
    if owner is not None and owner["pid"] == os.getpid():
        path.unlink(missing_ok=True)


def release_all() -> None:
    """Remove every lock this process holds: at the end of a CLI command and at interpreter exit."""
    for path in list(_held):
        release(path)


atexit.register(release_all)
