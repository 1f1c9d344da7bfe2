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

History (docs/ARCHITECTURE.md, "The lake's history"): every commit is a version of its stage folder,
numbered 1, 2, ... A copy of each committed manifest stays under `_history/v<version>-<commit>.json`,
and the parts a newer commit no longer lists are kept (superseded, not deleted): a checkpoint's or an
evaluation's data can always be read back as it was (`Lake.history`, `evoforge sql --as-of`) until
`evoforge vacuum` removes what nothing refers to. The current `_manifest.json` stays the one commit
point: its copy is written after it, and a commit that finds its predecessor's copy missing (a writer
killed between the two) writes that copy first, so the history never lacks a version that was current
and never holds one that was not.
"""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from evoforge.data.atomic import write_text
from evoforge.data.schemas import ROUND_TABLES, RUN_TABLES
from evoforge.data.ids import stable_hash
from evoforge.data.storage import LakePath, is_remote, parquet_metadata

MANIFEST_NAME = "_manifest.json"
HISTORY_FOLDER = "_history"
HISTORY_NAME = re.compile(r"v(?P<version>\d{8})-(?P<commit>[0-9a-f]{32})\.json")
FORMAT = 1  # `version` and `config_hash` were added without a new format: an older reader ignores them
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
    version: int = 1  # 1, 2, ... per stage folder (a manifest written before versions is version 1)
    config_hash: str | None = None  # the stage config that produced it, when a stage run committed it
    vacuumed_at: str | None = None  # in a `_history/` copy: when `evoforge vacuum` removed parts only it listed
    # the parts of earlier versions still kept in the folder (those it held at this commit), so a sweep
    # tells them from a dead writer's leftovers without reading every version; None: written before it
    superseded: tuple[str, ...] | None = None

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
    return _parse_manifest(path, text)


def _parse_manifest(path: LakePath, text: str) -> Manifest:
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
        version = data.get("version", 1)
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"version {version!r} is not a positive integer")
        superseded = data.get("superseded")
        if superseded is not None and not (isinstance(superseded, list) and all(isinstance(f, str) for f in superseded)):
            raise ValueError("superseded is not a list of part files")
        return Manifest(commit=data["commit"], committed_at=data["committed_at"], parts=parts, version=version,
                        config_hash=data.get("config_hash"), vacuumed_at=data.get("vacuumed_at"),
                        superseded=tuple(superseded) if superseded is not None else None)
    except (ValueError, KeyError, TypeError) as err:
        raise ManifestError(path, f"unreadable manifest: {err}") from None


def _body(manifest: Manifest) -> str:
    body = {"format": FORMAT, "commit": manifest.commit, "committed_at": manifest.committed_at,
            "version": manifest.version, "config_hash": manifest.config_hash,
            "parts": [asdict(p) for p in manifest.parts]}
    if manifest.superseded is not None:
        body["superseded"] = list(manifest.superseded)
    if manifest.vacuumed_at:
        body["vacuumed_at"] = manifest.vacuumed_at
    return json.dumps(body, indent=1) + "\n"


def _history_path(stage_dir: LakePath, manifest: Manifest) -> LakePath:
    return stage_dir / HISTORY_FOLDER / f"v{manifest.version:08d}-{manifest.commit}.json"


def history_names(stage_dir: LakePath) -> dict[int, LakePath]:
    """version -> its copy under `_history/`, as listed (one listing; nothing is read)."""
    found = {}
    for path in (stage_dir / HISTORY_FOLDER).glob("*"):  # nothing when there is no history yet
        match = HISTORY_NAME.fullmatch(path.name)
        if match:
            found[int(match["version"])] = path
    return found


def read_history(stage_dir: LakePath) -> list[Manifest]:
    """Every version the stage folder has had, oldest first: the copies under `_history/` and the
    current manifest (whose copy a killed writer may not have written yet). ManifestError names an
    unreadable copy: what it listed is unknown, so nothing may be vacuumed on a guess."""
    versions = {}
    for version, path in history_names(stage_dir).items():
        versions[version] = _parse_manifest(path, path.read_text())
    current = read_manifest(stage_dir)
    if current is not None:
        versions[current.version] = current
    return [versions[v] for v in sorted(versions)]


def mark_vacuumed(stage_dir: LakePath, manifest: Manifest, when: str) -> None:
    """Rewrite a superseded version's copy to say its own parts were removed (written before they are)."""
    write_text(_history_path(stage_dir, manifest), _body(replace(manifest, vacuumed_at=when)))


def write_manifest(stage_dir: LakePath, parts: list[Part], config_hash: str | None = None) -> Manifest:
    """Commit `parts` as the stage folder's next version (see the module doc for the order of writes).
    The manifest also names the parts of earlier versions still in the folder (`superseded`): found by
    the one listing of the folder that finds its history copies, from the version it replaces."""
    present = {path.relative_to(stage_dir).as_posix(): path for path in stage_dir.rglob("*") if path.is_file()}
    copies = {int(match["version"]): path for relative, path in present.items()
              if relative.startswith(f"{HISTORY_FOLDER}/") and (match := HISTORY_NAME.fullmatch(path.name))}
    try:
        current = read_manifest(stage_dir)
    except ManifestError:
        current = None  # an unreadable manifest is being replaced: its version number is lost, not reused
    if current is not None and current.version not in copies:
        write_text(_history_path(stage_dir, current), _body(current))
    version = max([*copies, current.version if current else 0]) + 1
    earlier: set[str] = set()
    if current is not None:
        earlier = {p.file for p in current.parts} | set(current.superseded or ())
        if current.superseded is None:  # a version written before the list: its predecessors' parts, once
            try:
                earlier |= {p.file for version_ in read_history(stage_dir) for p in version_.parts}
            except ManifestError:
                pass  # a damaged copy: its parts are not named here, and a sweep reads the history to keep them
    files = {p.file for p in parts}
    manifest = Manifest(commit=uuid.uuid4().hex, committed_at=datetime.now(timezone.utc).isoformat(),
                        parts=tuple(sorted(parts, key=lambda p: (p.table, p.key or "", p.file))),
                        version=version, config_hash=config_hash,
                        superseded=tuple(sorted(f for f in earlier - files if f in present)))
    write_text(stage_dir / MANIFEST_NAME, _body(manifest))  # the commit
    write_text(_history_path(stage_dir, manifest), _body(manifest))
    return manifest


def part_damage(stage_dir: LakePath, part: Part, *, checksum: bool, data: bytes | None = None,
                listed: LakePath | None | bool = None) -> str | None:
    """Why the file does not match its manifest entry, or None. Without `checksum` only the cheap
    checks (size, Parquet footer, row count) run: what every query does; `doctor` and the stages
    that read a part check the checksum too, a reader on the `data` it has already read. `listed`:
    the part as a listing of its folder found it (its size known without asking the store again), or
    False when that listing did not find it."""
    if listed is False:
        return "missing"
    path = listed or stage_dir / part.file
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
