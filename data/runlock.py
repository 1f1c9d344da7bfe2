"""One stage at a time per run: an exclusive lock file in the run folder.

`flock` is released by the kernel when its holder dies (SIGKILL included), so a crashed run never
leaves a stale lock. The lock is re-entrant within a process: a round holds it and its stages take
it again. Two different runs have different folders and never wait for each other.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path


class RunBusy(RuntimeError):
    pass


_held: dict[Path, int] = {}
_guard = threading.Lock()
_files: dict[Path, int] = {}


@contextmanager
def run_lock(run_dir: Path, what: str):
    """Hold the run's lock while doing `what` (e.g. "round 1 / generate"); RunBusy if another process has it."""
    path = (Path(run_dir) / ".lock").resolve()
    with _guard:
        if path in _held:
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if not reentered:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunBusy(f"run {path.parent.name!r} is busy: {holder}; wait for it to finish or stop that process "
                          f"(lock: {path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
        with _guard:
            _held[path], _files[path] = 1, fd
    try:
        yield
    finally:
        with _guard:
            _held[path] -= 1
            release = _held[path] == 0
            if release:
                del _held[path]
                fd = _files.pop(path)
        if release:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, KeyError):
        return "another process holds its lock"
