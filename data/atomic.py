"""Every file and folder evoforge writes appears whole or not at all.

One way of writing, for every file the project writes (lake parts, chunks, configs, reports, the
catalog, checkpoints, converted models): build it under a hidden temporary name in its destination
folder, `.<name>.tmp-<32 hex digits>`, fsync it, rename it over the destination and fsync the folder,
so a crash leaves the old content or the new, and a power loss cannot undo the rename. Because every
writer uses the same temporary name, `leftovers()` finds everything a dead writer left behind.

On object storage (data/storage.py) an object appears whole when its upload completes and there is no
rename: the content is built in a local temporary file and uploaded under its final key.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from evoforge.data.storage import ObjectPath, abort_unfinished_uploads, is_remote, move, upload_tree

TEMPORARY_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{32}$")


def temporary_path(path: Path) -> Path:
    """A hidden sibling of `path` that only this writer uses; matches no reader's glob."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"


def fsync_folder(folder: Path) -> None:
    """Make a rename (or a new file) in `folder` survive a power loss."""
    if is_remote(folder):
        return  # an object is durable once its upload completed
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if path.is_dir():
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            fsync_folder(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(built: Path, path: Path) -> Path:
    """Put `built` (a finished file or folder) at `path`, replacing what was there.

    A file replaces a file in one rename. A folder cannot be renamed over a non-empty folder, so the
    old one is first renamed aside under a temporary name (which `leftovers()` recognises) and
    removed after the new one is in place."""
    if is_remote(built):
        move(built, path)
        return path
    _fsync_tree(built)
    retired = None
    if path.is_dir() and built.is_dir():
        retired = temporary_path(path)
        os.replace(path, retired)
    try:
        os.replace(built, path)
    except BaseException:
        if retired is not None:  # put the old one back rather than leave nothing at `path`
            os.replace(retired, path)
        raise
    fsync_folder(path.parent)
    if retired is not None:
        _remove(retired)
    return path


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content at (a file, or a folder the caller
    creates); on success it is committed over `path`, on any error it is removed. For an object it
    is a local file (or folder) that is uploaded on success."""
    if is_remote(path):
        with _local_build(path) as tmp:
            yield tmp
            if tmp.is_dir():
                upload_tree(tmp, path)
            else:
                path.upload(tmp)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


@contextmanager
def _local_build(target: ObjectPath) -> Iterator[Path]:
    from evoforge.data import home

    tmp = temporary_path(home.home() / ".tmp" / "uploads" / target.name)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    finally:
        if tmp.exists():
            _remove(tmp)


def write_bytes(path, data: bytes, mode: int | None = None):
    """`data` as `path`'s whole new content; `mode` (a local file's permissions, e.g. 0o600 for a secret) holds
    from the temporary file's creation on, so the content is never readable by others, not even briefly."""
    if is_remote(path):
        path.write_bytes(data)  # one PUT: whole or nothing
        return path
    with atomic_path(path) as tmp:
        if mode is None:
            tmp.write_bytes(data)
        else:
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(descriptor, "wb") as fh:
                fh.write(data)
    return Path(path)


def write_text(path, text: str, mode: int | None = None):
    return write_bytes(path, text.encode(), mode)


def leftovers(root: Path) -> list[Path]:
    """The temporary files and folders below `root` that a writer left behind (it died mid-write).
    None on object storage: an upload a writer did not complete never becomes an object (what it
    leaves there is an unfinished multipart upload, which `remove_leftovers` aborts)."""
    if is_remote(root):
        return []
    found: list[Path] = []
    for current, folders, files in os.walk(root):
        for name in files + folders:
            if TEMPORARY_NAME.fullmatch(name):
                found.append(Path(current) / name)
        folders[:] = [f for f in folders if not TEMPORARY_NAME.fullmatch(f)]
    return sorted(found)


def remove_leftovers(root: Path) -> int:
    """Remove what `leftovers()` finds, and on object storage abort the uploads writers that died left
    unfinished below `root` (data/storage.py `unfinished_uploads`); returns the count. Only safe while
    no writer is at work below `root` (the run's lock is held)."""
    if is_remote(root):
        return abort_unfinished_uploads(root)
    found = leftovers(root)
    for path in found:
        _remove(path)
    return len(found)
