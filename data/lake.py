"""The Parquet lake: the source of truth for every artifact.

Layout (DESIGN.md):
    runs/<run>/round=<r>/<stage>/_manifest.json            the stage's committed output (data/manifest.py)
    runs/<run>/round=<r>/<stage>/<table>/part-<hex>.parquet  its parts
    runs/<run>/stage_runs/part-<hex>.parquet               one file per stage_runs event
    runs/<run>/round=0/_schema/<table>/part-schema.parquet  zero-row file per table, so that the views
    runs/<run>/stage_runs/part-schema.parquet               have their columns before any stage ran

A stage's output is committed by its manifest, written last and atomically, and readers read exactly
the parts it lists, after checking them against it: a damaged part (missing, truncated, changed) is
named in one line with the command that heals it, never read as data. A `stage_runs` event is one
file written whole (data/atomic.py); only evoforge's part names are read there.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from evoforge.data import home, schemas
from evoforge.data.atomic import atomic_path, commit, fsync_folder, leftovers, remove_leftovers
from evoforge.data.manifest import (
    MANIFEST_NAME, PART_NAME, Manifest, ManifestError, Part, describe_part, new_part_name, part_damage,
    read_manifest, write_manifest,
)
from evoforge.data.storage import (
    LakePath, is_remote, location, move, parquet_metadata, parquet_schema, read_parquet, write_parquet_object,
)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA_FOLDER = "_schema"
SCHEMA_PART = "part-schema.parquet"
DAMAGED_FOLDER = "_damaged"
# parts an evoforge before manifests wrote: part-00000 (a whole stage), part-<16 hex> (one ingest source,
# the same key a manifest records for it now)
LEGACY_PART = re.compile(r"^part-(?:\d{5}|(?P<key>[0-9a-f]{16}))\.parquet$")


class LakeError(ValueError):
    pass


@dataclass(frozen=True)
class Damage:
    """A file the lake cannot use as its manifest says: one line names it and how to heal it."""
    run: str
    path: LakePath
    reason: str
    round: int | None = None
    stage: str | None = None  # None: a run table (stage_runs)

    def line(self) -> str:
        if self.stage == "ingest":
            heal = f"ingest its source again with --force (run {self.run})"
        elif self.stage is not None:
            heal = f"rerun `evoforge stage {self.stage} --run {self.run} --round {self.round} --force`"
        else:
            heal = f"`evoforge doctor --run {self.run} --repair` moves it aside"
        return f"damaged: {self.path} ({self.reason}); {heal}, or `evoforge doctor --run {self.run} --repair`"


class DamagedPart(LakeError):
    def __init__(self, damage: Damage):
        super().__init__(damage.line())
        self.damage = damage


@dataclass
class RunHealth:
    """What a run's folder holds beside its committed data (`Lake.inspect`)."""
    files: dict[str, list[LakePath]] = field(default_factory=dict)  # table -> healthy committed parts (+ schema file)
    damaged: list[Damage] = field(default_factory=list)
    unnamed: list[LakePath] = field(default_factory=list)  # files in table folders that no manifest lists
    leftovers: list[LakePath] = field(default_factory=list)  # temporary files and uncommitted parts of dead writers
    legacy: list[LakePath] = field(default_factory=list)  # parts of a stage an evoforge before manifests wrote


def write_parquet(table: pa.Table, path: LakePath) -> LakePath:
    if is_remote(path):
        write_parquet_object(table, path)  # visible only once whole
        return path
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class _HashingSink:
    """A binary sink that checksums and counts what passes through to the file or object under it."""

    def __init__(self, raw):
        self.raw, self.digest, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        self.raw.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


class PartWriter:
    """One new part under its final name, written as it comes (tables or record batches): nobody
    reads it before a manifest lists it, so no rename is needed, the same protocol on disk and on
    object storage (where the object appears only when its upload completes). It is made durable
    and described (rows, bytes, checksum of what was written) before a manifest may name it."""

    def __init__(self, stage_dir: LakePath, table: str, schema: pa.Schema, key: str | None):
        self.stage_dir, self.table, self.key = stage_dir, table, key
        self.file = f"{table}/{new_part_name()}"
        path = stage_dir / self.file
        if is_remote(path):
            self._raw = path.fs.open_output_stream(path._path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._raw = open(path, "wb")
        self._sink = _HashingSink(self._raw)
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")
        self.rows = 0

    def write(self, rows: pa.Table | pa.RecordBatch) -> None:
        self._writer.write(rows)
        self.rows += rows.num_rows

    @property
    def bytes_written(self) -> int:
        return self._sink.size

    def close(self) -> Part:
        self._writer.close()
        if not is_remote(self.stage_dir):
            self._raw.flush()
            os.fsync(self._raw.fileno())
        self._raw.close()  # an object upload completes here
        return Part(table=self.table, file=self.file, rows=self.rows, bytes=self._sink.size,
                    sha256=self._sink.digest.hexdigest(), key=self.key)

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            (self.stage_dir / self.file).unlink(missing_ok=True)


def _write_part(table: pa.Table, stage_dir: LakePath, name: str, key: str | None) -> Part:
    writer = PartWriter(stage_dir, name, table.schema, key)
    try:
        writer.write(table)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class Lake:
    def __init__(self, root: str | LakePath):
        self.root = location(root)  # a folder, or an s3:// prefix (data/storage.py)
        if is_remote(self.root):
            self.root.check_bucket()

    # -- paths ---------------------------------------------------------------------------------
    def run_dir(self, run: str) -> LakePath:
        if not RUN_NAME.match(run or ""):
            raise LakeError(
                f"run name {run!r} is not valid: use letters, digits, '-', '_' or '.', at most 64 characters"
            )
        return self.root / run

    def existing_run_dir(self, run: str) -> LakePath:
        """The run's folder; LakeError listing the runs there when it does not exist."""
        run_dir = self.run_dir(run)
        if not run_dir.is_dir():
            runs = sorted(p.name for p in self.root.iterdir() if p.is_dir() and RUN_NAME.match(p.name)) \
                if self.root.is_dir() else []
            raise LakeError(f"run {run!r} does not exist under {self.root}; runs there: {', '.join(runs) or 'none'}")
        return run_dir

    def stage_dir(self, run: str, round: int, stage: str) -> LakePath:
        return self.run_dir(run) / f"round={int(round)}" / stage

    def stage_dirs(self, run: str, round: int | None = None, stage: str | None = None) -> list[tuple[int, str, LakePath]]:
        """(round, stage, folder) of every stage folder of the run, oldest round first."""
        found = []
        for folder in self.run_dir(run).glob(f"round={'*' if round is None else int(round)}/{stage or '*'}"):
            if folder.is_dir() and folder.name != SCHEMA_FOLDER and not folder.name.startswith("."):
                found.append((int(folder.parent.name.split("=", 1)[1]), folder.name, folder))
        return sorted(found)

    def ensure_run(self, run: str) -> LakePath:
        """Create the run folder with a zero-row schema file per table (see module doc)."""
        run_dir = self.run_dir(run)
        for name, schema in {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}.items():
            folder = run_dir / name if name in schemas.RUN_TABLES else run_dir / "round=0" / SCHEMA_FOLDER / name
            path = folder / SCHEMA_PART
            try:
                current = parquet_schema(path)
            except FileNotFoundError:
                current = None
            except Exception:  # a damaged schema file is rewritten: it holds no data
                current = None
            if current != schema:
                write_parquet(schema.empty_table(), path)
        return run_dir

    # -- committed output ----------------------------------------------------------------------
    def manifest(self, run: str, round: int, stage: str) -> Manifest | None:
        try:
            return read_manifest(self.stage_dir(run, round, stage))
        except ManifestError as err:
            raise DamagedPart(Damage(run, err.path, err.reason, round, stage)) from None

    def has_output(self, run: str, round: int, stage: str) -> bool:
        return self.manifest(run, round, stage) is not None

    def output_fingerprint(self, run: str, round: int, stage: str, key: str | None = None) -> str | None:
        manifest = self.manifest(run, round, stage)
        return manifest.fingerprint(key) if manifest else None

    def output_damage(self, run: str, round: int, stage: str, key: str | None = None) -> list[Damage]:
        """The committed parts of a stage (of one key) that do not match their manifest, checksums included."""
        manifest = self.manifest(run, round, stage)
        folder = self.stage_dir(run, round, stage)
        found = []
        for part in manifest.parts if manifest else ():
            if key is None or part.key == key:
                reason = part_damage(folder, part, checksum=True)
                if reason:
                    found.append(Damage(run, folder / part.file, reason, round, stage))
        return found

    # -- reads ---------------------------------------------------------------------------------
    def read(self, run: str, table: str, round: int | None = None, stage: str | None = None,
             exclude_key: str | None = None) -> pa.Table:
        """All committed rows of `table` in the run (optionally one round / stage), with `round` and
        `stage` (the stage that wrote them) from the path, as the DuckDB views have them. Each part
        is checked against its manifest (size, checksum) as it is read: DamagedPart names a bad one."""
        schema = self._schema(table)
        if table in schemas.RUN_TABLES:
            return self._read_run_table(run, table, schema)
        parts = []
        for r, s, folder in self.stage_dirs(run, round, stage):
            for rows in self._read_stage_table(run, r, s, folder, table, exclude_key):
                rows = schemas.conform(rows, schema, where=f"{folder}/{table}", missing_as_null=True)
                rows = rows.append_column("round", pa.array([r] * rows.num_rows, pa.int32()))
                parts.append(rows.append_column("stage", pa.array([s] * rows.num_rows, pa.string())))
        if not parts:
            empty = schema.empty_table()
            empty = empty.append_column("round", pa.array([], pa.int32()))
            return empty.append_column("stage", pa.array([], pa.string()))
        return pa.concat_tables(parts)

    def _read_stage_table(self, run, round, stage, folder, table, exclude_key) -> list[pa.Table]:
        if not (folder / table).is_dir():  # the stage never wrote this table: its manifest is not ours to read
            return []
        for _attempt in range(3):  # a writer may commit (and remove the old parts) while we read
            manifest = self.manifest(run, round, stage)
            if manifest is None:
                return []
            try:
                return [self._read_part(run, round, stage, folder, part) for part in manifest.parts
                        if part.table == table and (exclude_key is None or part.key != exclude_key)]
            except DamagedPart:
                latest = self.manifest(run, round, stage)
                if latest is None or latest.commit == manifest.commit:
                    raise
        raise LakeError(f"{folder}: the output kept changing while it was read; try again")

    @staticmethod
    def _read_part(run, round, stage, folder: LakePath, part: Part) -> pa.Table:
        path = folder / part.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DamagedPart(Damage(run, path, "missing", round, stage)) from None
        reason = part_damage(folder, part, checksum=True, data=data)
        if reason:
            raise DamagedPart(Damage(run, path, reason, round, stage))
        return read_parquet(path, data)

    def _read_run_table(self, run: str, table: str, schema: pa.Schema) -> pa.Table:
        parts = []
        for path in self.run_table_files(run, table):
            try:
                rows = read_parquet(path)
            except FileNotFoundError:
                continue
            except Exception as err:
                raise DamagedPart(Damage(run, path, f"unreadable ({str(err).splitlines()[0][:120]})")) from None
            parts.append(schemas.conform(rows, schema, where=str(path), missing_as_null=True))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def run_table_files(self, run: str, table: str) -> list[LakePath]:
        folder = self.run_dir(run) / table
        return sorted(p for p in folder.glob("part-*.parquet") if PART_NAME.match(p.name)) if folder.is_dir() else []

    @staticmethod
    def _schema(table: str) -> pa.Schema:
        try:
            return {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}[table]
        except KeyError:
            raise LakeError(f"unknown table {table!r}") from None

    # -- writes --------------------------------------------------------------------------------
    def append_run_table(self, run: str, table: str, rows: pa.Table) -> LakePath:
        rows = schemas.conform(rows, self._schema(table), where=table)
        self.ensure_run(run)
        return write_parquet(rows, self.run_dir(run) / table / new_part_name())

    def publish_stage(self, run: str, round: int, stage: str, tables: dict[str, pa.Table],
                      key: str | None = None) -> str | None:
        """Commit `tables` as the stage's output; returns the output fingerprint (of `key`'s parts).

        Without `key` the whole output is replaced; with one, only the parts of that key (ingest: one
        source). New parts first, then the manifest (the commit), then the superseded parts go: a
        crash at any point leaves the old output or the new one, whole. Callers hold the run's lock."""
        self.ensure_run(run)
        folder = self.stage_dir(run, round, stage)
        conformed = {t: schemas.conform(rows, self._schema(t), where=f"{stage}/{t}") for t, rows in tables.items()}
        try:
            old = self.manifest(run, round, stage)
        except DamagedPart:
            if key is not None:  # the other inputs' parts are unknown: doctor --repair first
                raise
            old = None  # the whole output is replaced, the unreadable manifest with it
        written = [_write_part(rows, folder, table, key) for table, rows in conformed.items()]
        for table_folder in {(folder / p.file).parent for p in written}:
            fsync_folder(table_folder)
        kept = [p for p in (old.parts if old else ()) if key is not None and p.key != key]
        manifest = write_manifest(folder, kept + written)
        for part in (old.parts if old else ()):
            if part not in kept:
                (folder / part.file).unlink(missing_ok=True)
        return manifest.fingerprint(key)

    # -- health --------------------------------------------------------------------------------
    def inspect(self, run: str, checksum: bool = False) -> RunHealth:
        """Every committed part checked against its manifest (cheaply, or with checksums), the files no
        manifest lists, and the leftovers of dead writers. What status, sql and doctor report."""
        run_dir = self.run_dir(run)
        health = RunHealth()
        for name in schemas.ROUND_TABLES:
            schema_file = run_dir / "round=0" / SCHEMA_FOLDER / name / SCHEMA_PART
            health.files[name] = [schema_file] if schema_file.exists() else []
        for round, stage, folder in self.stage_dirs(run):
            try:
                manifest = read_manifest(folder)
            except ManifestError as err:
                health.damaged.append(Damage(run, err.path, err.reason, round, stage))
                continue
            listed = set()
            for part in manifest.parts if manifest else ():
                listed.add(part.file)
                reason = part_damage(folder, part, checksum=checksum)
                if reason:
                    health.damaged.append(Damage(run, folder / part.file, reason, round, stage))
                elif part.table in health.files:
                    health.files[part.table].append(folder / part.file)
            for path in sorted(folder.glob("*/*")):
                relative = path.relative_to(folder).as_posix()
                if not path.is_file() or relative in listed or path.name.startswith("."):
                    continue
                if PART_NAME.match(path.name):
                    health.leftovers.append(path)
                elif manifest is None and LEGACY_PART.match(path.name) and path.parent.name in schemas.ROUND_TABLES:
                    health.legacy.append(path)
                else:
                    health.unnamed.append(path)
        for table in schemas.RUN_TABLES:
            folder = run_dir / table
            health.files[table] = [folder / SCHEMA_PART] if (folder / SCHEMA_PART).exists() else []
            for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                if path.name == SCHEMA_PART or path.name.startswith("."):
                    continue
                if not PART_NAME.match(path.name):
                    health.unnamed.append(path)
                    continue
                try:
                    parquet_metadata(path) if not checksum else read_parquet(path)
                    health.files[table].append(path)
                except Exception as err:
                    health.damaged.append(Damage(run, path, f"unreadable ({str(err).splitlines()[0][:120]})"))
        health.leftovers += leftovers(run_dir)
        return health

    def sweep(self, run: str) -> int:
        """Remove what writers that died left behind: temporary files (data/atomic.py) and parts no
        manifest lists under evoforge's part names; returns the count. Only while no writer of the run
        is alive (the caller holds the run's lock). A file with any other name is the user's: kept."""
        removed = remove_leftovers(self.run_dir(run))
        for path in self.inspect(run).leftovers:
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def adopt_legacy(self, run: str, legacy: list[LakePath]) -> list[str]:
        """Commit the parts an evoforge before manifests wrote (`inspect().legacy`) under a manifest, as
        they are: renamed to part names and listed with their rows, sizes and checksums. Caller holds
        the run's lock."""
        lines = []
        by_stage: dict[LakePath, list[LakePath]] = {}
        for path in legacy:
            by_stage.setdefault(path.parent.parent, []).append(path)
        for folder, paths in sorted(by_stage.items()):
            if read_manifest(folder) is not None:
                continue
            parts = []
            for path in paths:
                target = path.parent / new_part_name()
                commit(path, target)
                parts.append(describe_part(folder, path.parent.name, target, LEGACY_PART.match(path.name)["key"]))
            write_manifest(folder, parts)
            lines.append(f"{folder.relative_to(self.run_dir(run))}: committed {len(parts)} part(s) written before "
                         f"manifests ({sum(p.rows for p in parts)} rows)")
        return lines

    def repair(self, run: str, damaged: list[Damage]) -> list[str]:
        """Move damaged files aside (runs/<run>/_damaged/<time>/...) and uncommit what they belong to:
        the whole output of a stage (its tables belong together), or for a stage committed one input
        at a time, that input's parts. The stage then counts as not run: the next round or stage
        command recomputes it. Returns one line per action. Caller holds the run's lock."""
        run_dir = self.run_dir(run)
        aside = run_dir / DAMAGED_FOLDER / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        lines = []

        def move_aside(path: LakePath) -> LakePath:
            target = aside / path.relative_to(run_dir).as_posix()
            move(path, target)
            fsync_folder(path.parent)
            return target

        for damage in damaged:
            if damage.stage is None or damage.path.name == MANIFEST_NAME:
                if damage.path.exists():
                    lines.append(f"moved {damage.path.relative_to(run_dir)} to {move_aside(damage.path).relative_to(run_dir)}")
                continue
            folder = self.stage_dir(run, damage.round, damage.stage)
            manifest = read_manifest(folder)
            entry = next((p for p in manifest.parts if folder / p.file == damage.path), None) if manifest else None
            if entry is None:
                continue  # uncommitted already (an earlier damage of the same output)
            if damage.path.exists():
                move_aside(damage.path)
            dropped = [p for p in manifest.parts if entry.key is None or p.key == entry.key]
            kept = [p for p in manifest.parts if p not in dropped]
            if kept:
                write_manifest(folder, kept)
            else:
                move_aside(folder / MANIFEST_NAME)
            for part in dropped:
                if part != entry:
                    (folder / part.file).unlink(missing_ok=True)
            what = f"the parts of input {entry.key}" if entry.key else "its output"
            lines.append(f"round {damage.round} {damage.stage}: moved {damage.path.name} aside and uncommitted "
                         f"{what} ({sum(p.rows for p in dropped)} rows); it will be recomputed")
        return lines


_lake: Lake | None = None


def lake() -> Lake:
    """This process's lake, built once from the home settings (EVOFORGE_RUNS, EVOFORGE_HOME)."""
    global _lake
    if _lake is None:
        _lake = Lake(home.runs_root())
    return _lake


def use_lake(root: str | LakePath | None) -> Lake | None:
    """Point this process at the lake under `root` (None: back to the home settings), e.g. for a test."""
    global _lake
    _lake = Lake(root) if root is not None else None
    return _lake
