"""One stage at a time per run: an exclusive lock file in the run folder.

`flock` is released by the kernel when its holder dies (SIGKILL included), so a crashed run never
leaves a stale lock. The lock is re-entrant for the thread that holds it (a round holds it and its
stages take it again); another thread of the same process is refused like another process. Two
different runs have different folders and never wait for each other.

A run on object storage (`str(run_dir)` starts with `s3://`, EVOFORGE_RUNS=s3://bucket/prefix) has no
flock and is shared by several machines: its lock is a lease object, `<run>/_lock.json`, taken and
renewed with S3 conditional writes (data/lease.py), with the same re-entrancy per thread and the same
RunBusy. A holder that dies releases it when its lease expires (EVOFORGE_LOCK_TTL_SECONDS, default 60).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from evoforge.data.lock_errors import LeaseLost, LockUnavailable, RunBusy  # noqa: F401 (raised here, imported from here)


_held: dict[Path, list] = {}  # lock path -> [owning thread, depth]
_guard = threading.Lock()
_files: dict[Path, int] = {}


@contextmanager
def run_lock(run_dir: Path, what: str):
    """Hold the run's lock while doing `what` (e.g. "round 1 / generate"); RunBusy if another process,
    or another thread of this one, has it. Re-entrant for the thread that holds it (a round's stages).
    `run_dir` is a local folder, or anything whose str() is an `s3://bucket/key` URI (an S3 lease)."""
    if str(run_dir).startswith("s3:/"):
        from evoforge.data.lease import s3_run_lock

        with s3_run_lock(str(run_dir), what):
            yield
        return
    path = (Path(run_dir) / ".lock").resolve()
    me = threading.get_ident()
    with _guard:
        holder = _held.get(path)
        if holder is not None and holder[0] != me:
            raise RunBusy(f"run {path.parent.name!r} is busy: another thread of this process (pid {os.getpid()}) "
                          f"holds its lock; wait for it to finish (lock: {path})")
        if holder is not None:
            holder[1] += 1
    if holder is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder_text = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunBusy(f"run {path.parent.name!r} is busy: {holder_text}; wait for it to finish or stop that process "
                          f"(lock: {path})") from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise LockUnavailable(f"cannot lock run {path.parent.name!r}: the file system under {path.parent.parent} "
                                      f"does not support locks ({errno.errorcode[err.errno]}, e.g. NFS mounted nolock); "
                                      "put the runs on a disk that does (EVOFORGE_RUNS)") from None
            raise
        with _guard:
            if path in _held:  # another thread of ours took it between the check and the flock
                os.close(fd)
                raise RunBusy(f"run {path.parent.name!r} is busy: another thread of this process holds its lock")
            _held[path], _files[path] = [me, 1], fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
    try:
        yield
    finally:
        with _guard:
            _held[path][1] -= 1
            release = _held[path][1] == 0
            if release:
                del _held[path]
                fd = _files.pop(path)
        if release:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def check_run_lease(run_dir) -> None:
    """Just before a commit: LeaseLost if this process's S3 lease of the run was taken over; a no-op for
    a local run (an flock cannot be lost) or a run this process holds no lock of (data/lease.py)."""
    if str(run_dir).startswith("s3:/"):
        from evoforge.data.lease import check_run_lease as check

        check(str(run_dir))


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"{info['what']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, KeyError):
        return "another process holds its lock"
