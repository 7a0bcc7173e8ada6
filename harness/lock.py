"""The one-harness-per-grid lock: ``<grid>/.harness/lock``, an OS lock that a killed harness releases by dying;
its file says who runs the grid (pid, launcher, slots). ``harness.grid`` takes it; readers (status, collect)
ask whether a harness is live."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .runs import GridError
from .store import HARNESS_DIR


def _lock_path(grid_dir: Path) -> Path:
    return Path(grid_dir) / HARNESS_DIR / "lock"


class GridLock:
    """Exclusive OS lock on a grid; its file holds who runs the grid (pid, launcher, slots)."""

    def __init__(self, grid_dir: Path):
        self.path = _lock_path(grid_dir)
        self._fd: int | None = None

    def acquire(self, info: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_info(self.path.parent.parent) or {}
            raise GridError([f"grid {self.path.parent.parent} is being run by another harness "
                             f"(pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')})"]) from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(dict(info)) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def grid_is_live(grid_dir: Path) -> bool:
    """Is a harness running this grid right now?"""
    path = _lock_path(grid_dir)
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


def lock_info(grid_dir: Path) -> dict[str, Any] | None:
    path = _lock_path(grid_dir)
    try:
        text = path.read_text().strip()
        return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
        return None


