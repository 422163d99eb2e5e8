"""One writer per run folder: a pid file `.fastmae.lock`, taken by rank 0 before anything is written.

Two runs in one output folder would overwrite each other's checkpoints and log while both exit 0. The lock
file holds the owner's pid and host; a lock whose process is gone on this host (os.kill(pid, 0) fails with
ProcessLookupError) is stale and taken over. Creating it with O_EXCL makes the take-over race-free between
two starting runs: only one of them creates the file.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".fastmae.lock"
_held: dict[Path, int] = {}  # lock path -> pid that took it (a forked child does not own its parent's lock)


class RunFolderInUseError(ValueError):
    """Another live fastmae process holds the run folder's lock; a user error (exit 2), not a bug."""


def _owner(path: Path) -> dict | None:
    """The lock's {'pid', 'host'}, or None when it is missing or unreadable (a writer killed mid-write)."""
    try:
        data = json.loads(path.read_text())
        return {"pid": int(data["pid"]), "host": str(data.get("host", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return True


def acquire(folder: str | Path) -> Path:
    """Take the lock on `folder` (which exists), taking over a stale one; RunFolderInUseError if it is held.

    The same process may take its own lock again (a second command run in-process, e.g. from Python).
    """
    path = Path(folder) / LOCK_NAME
    for _ in range(3):  # another starter may remove a stale lock between our read and our create
        if _try_create(path):
            _held[path] = os.getpid()
            return path
        owner = _owner(path)
        here = owner is not None and owner["host"] == socket.gethostname()
        if owner is not None and (owner["pid"] == os.getpid() and here):
            _held[path] = os.getpid()
            return path
        if owner is not None and (not here or _alive(owner["pid"])):
            raise RunFolderInUseError(
                f"{folder} is in use by another fastmae run (pid {owner['pid']}"
                f"{'' if here else ' on ' + owner['host']}); wait for it, or pass another --run.output_dir"
            )
        path.unlink(missing_ok=True)  # stale: its process is gone (or the file is unreadable)
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
