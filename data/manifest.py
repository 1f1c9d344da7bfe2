"""A stage's output is exactly what its manifest lists.

    runs/<run>/round=<r>/<stage>/_manifest.json          the commit: parts, row counts, sizes, checksums
    runs/<run>/round=<r>/<stage>/<table>/part-<32 hex>.parquet

A commit writes its parts under new names nobody reads yet, makes them durable, and then writes the
manifest in one atomic step (a rename on disk, a single PUT on object storage). Parts are never
overwritten, so a reader holding the old manifest can still read the old parts until the writer
removes them after its commit, and no moment exists without a valid output. A file the manifest does
not list is not data: a backup copy beside the parts, or a `COPY ... TO` into the folder, is ignored
(and reported by `evoforge status`); one with evoforge's part name is a leftover of a writer that died
before its commit, swept at the next stage start.

A part's `key` names the input it came from, for a stage that commits one input at a time (ingest:
one source file): a commit with a key replaces that key's parts and keeps the others.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from evoforge.data.atomic import write_text
from evoforge.data.schemas import ROUND_TABLES, RUN_TABLES
from evoforge.data.ids import stable_hash
from evoforge.data.storage import LakePath, is_remote, parquet_metadata

MANIFEST_NAME = "_manifest.json"
FORMAT = 1
PART_NAME = re.compile(r"part-[0-9a-f]{32}\.parquet")  # evoforge's own part names (committed or not): fullmatch
KNOWN_TABLES = frozenset(ROUND_TABLES) | frozenset(RUN_TABLES)


class ManifestError(ValueError):
    """A manifest that cannot be read: the stage's output is unknown until it is rerun."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Part:
    table: str
    file: str  # relative to the stage folder: <table>/part-<32 hex>.parquet
    rows: int
    bytes: int
    sha256: str
    key: str | None = None  # the input the part came from, for stages that commit one input at a time


@dataclass(frozen=True)
class Manifest:
    commit: str
    committed_at: str
    parts: tuple[Part, ...]

    def tables(self) -> set[str]:
        return {p.table for p in self.parts}

    def fingerprint(self, key: str | None = None) -> str | None:
        """Content hash of the committed parts (of one key, if given); None when there are none.
        What the stage runner compares to skip an unchanged stage."""
        chosen = sorted((p.table, p.sha256) for p in self.parts if key is None or p.key == key)
        return stable_hash(*chosen) if chosen else None


def new_part_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def sha256_file(path: LakePath) -> str:
    """Streamed, so a part is never held whole to be checked (on disk or on object storage)."""
    digest = hashlib.sha256()
    with (path.fs.open_input_stream(path._path) if is_remote(path) else open(path, "rb")) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_part(stage_dir: LakePath, table: str, path: LakePath, key: str | None) -> Part:
    return Part(table=table, file=path.relative_to(stage_dir).as_posix(), rows=parquet_metadata(path).num_rows,
                bytes=path.stat().st_size, sha256=sha256_file(path), key=key)


def read_manifest(stage_dir: LakePath) -> Manifest | None:
    """The stage's committed output, or None when it has none."""
    path = stage_dir / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this evoforge reads {FORMAT}")
        parts = tuple(Part(**p) for p in data["parts"])
        for p in parts:
            # a table is one of the schemas' names (never a path: a tampered `../..` would point a part, and a
            # later sweep's delete, outside the lake), and its part sits right under the table's folder
            if p.table not in KNOWN_TABLES:
                raise ValueError(f"table {p.table!r} is not one of evoforge's tables")
            if not PART_NAME.fullmatch(Path(p.file).name) or Path(p.file).parent.as_posix() != p.table:
                raise ValueError(f"part {p.file!r} is not a part of table {p.table!r}")
        return Manifest(commit=data["commit"], committed_at=data["committed_at"], parts=parts)
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(path, f"unreadable manifest: {err}") from None


def write_manifest(stage_dir: LakePath, parts: list[Part]) -> Manifest:
    manifest = Manifest(commit=uuid.uuid4().hex, committed_at=datetime.now(timezone.utc).isoformat(),
                        parts=tuple(sorted(parts, key=lambda p: (p.table, p.key or "", p.file))))
    body = {"format": FORMAT, "commit": manifest.commit, "committed_at": manifest.committed_at,
            "parts": [asdict(p) for p in manifest.parts]}
    write_text(stage_dir / MANIFEST_NAME, json.dumps(body, indent=1) + "\n")
    return manifest


def part_damage(stage_dir: LakePath, part: Part, *, checksum: bool, data: bytes | None = None) -> str | None:
    """Why the file does not match its manifest entry, or None. Without `checksum` only the cheap
    checks (size, Parquet footer, row count) run: what every query does; `doctor` and the stages
    that read a part check the checksum too, a reader on the `data` it has already read."""
    path = stage_dir / part.file
    if data is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "missing"
    else:
        size = len(data)
    if size != part.bytes:
        return f"size {size} bytes, manifest says {part.bytes}"
    if checksum:
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        return None if digest == part.sha256 else "checksum differs from the manifest"
    try:
        rows = parquet_metadata(path).num_rows
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants for a broken footer
        return f"unreadable ({str(err).splitlines()[0][:120]})"
    return None if rows == part.rows else f"{rows} rows, manifest says {part.rows}"
