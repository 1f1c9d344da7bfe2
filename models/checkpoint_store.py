"""Checkpoints on the lake's store, so a stage on another machine can load the model a round trained.

On a local lake a checkpoint is trained straight into `runs/<run>/models/<id>/` as before. On object
storage it is trained in this machine's cache and then uploaded:

    s3://.../runs/<run>/models/<id>/<file>...          the checkpoint's files
    s3://.../runs/<run>/models/<id>/_checkpoint.json   written last: the commit (files, sizes, sha256)

A machine that needs it downloads it once into `.cache/checkpoints/<bucket>/<key>/`, checks every file
against `_checkpoint.json`, and commits the folder atomically: a half-downloaded or damaged copy is
never loaded, and a second use finds the verified copy.
"""
from __future__ import annotations

import json
from pathlib import Path

from evoforge.data import atomic, home
from evoforge.data.manifest import sha256_file
from evoforge.data.storage import LakePath, ObjectPath, is_remote, location

CHECKPOINT_MANIFEST = "_checkpoint.json"


class CheckpointError(RuntimeError):
    pass


def training_folder(target: LakePath) -> Path:
    """Where to train a checkpoint whose home is `target`: the target itself on a local lake, this
    machine's cache when the lake is on object storage (the trainer resumes from it either way)."""
    if is_remote(target):
        return home.cache_dir() / "checkpoints" / "training" / target.bucket / target.key
    return Path(target)


def is_published(target: LakePath) -> bool:
    return (target / CHECKPOINT_MANIFEST).exists() if is_remote(target) else Path(target).exists()


def publish(local: Path, target: LakePath) -> LakePath:
    """Upload a trained checkpoint folder to `target` (a no-op when it already is there) with its
    checksum manifest written last."""
    if not is_remote(target):
        return target
    files = sorted(p for p in Path(local).rglob("*") if p.is_file() and not p.name.startswith("."))
    entries = []
    for path in files:
        name = path.relative_to(local).as_posix()
        (target / name).upload(path)
        entries.append({"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    (target / CHECKPOINT_MANIFEST).write_text(json.dumps({"format": 1, "files": entries}, indent=1) + "\n")
    return target


def local_copy(reference: str) -> Path:
    """A local, verified folder for a checkpoint reference: an s3:// checkpoint is downloaded into the
    cache once (checked file by file against its manifest); anything else is returned as a Path."""
    where = location(reference) if reference.startswith("s3://") else None
    if where is None:
        return Path(reference)
    cached = home.cache_dir() / "checkpoints" / where.bucket / where.key
    if (cached / CHECKPOINT_MANIFEST).exists():
        return cached
    try:
        manifest = json.loads((where / CHECKPOINT_MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {reference}: no {CHECKPOINT_MANIFEST} (its upload never finished); "
                              "rerun the finetune stage that trained it") from None
    with atomic.atomic_path(cached) as staging:
        staging.mkdir(parents=True)
        for entry in manifest["files"]:
            path = staging / entry["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            ObjectPath.from_uri(f"{where}/{entry['file']}").download(path)
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {reference}: {entry['file']} does not match {CHECKPOINT_MANIFEST} "
                                      "(damaged on the store); rerun the finetune stage that trained it")
        (staging / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest))
    return cached
