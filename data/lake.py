"""The Parquet lake: the source of truth for every artifact.

Layout (docs/ARCHITECTURE.md, "The lake"):
    runs/<run>/round=<r>/<stage>/_manifest.json            the stage's committed output (data/manifest.py)
    runs/<run>/round=<r>/<stage>/<table>/part-<hex>.parquet  its parts
    runs/<run>/stage_runs/part-<hex>.parquet               one file per stage_runs event
    runs/<run>/round=0/_schema/<table>/part-schema.parquet  zero-row file per table, so that the views
    runs/<run>/stage_runs/part-schema.parquet               have their columns before any stage ran

A stage's output is committed by its manifest, written last and atomically, and readers read exactly
the parts it lists, after checking them against it: a damaged part (missing, truncated, changed) is
named in one line with the command that heals it, never read as data. A `stage_runs` event is one
file written whole (data/atomic.py); only evoforge's part names are read there.

Memory does not grow with a round: a table is written as it is produced, in parts bounded by
PART_MAX_ROWS / PART_MAX_BYTES, and read back part by part, one row group at a time
(`read_batches`); `read` is for the small tables (the pool, stats, checkpoints). Many tiny
`stage_runs` files are merged into one under the run lock (`compact_run_table`); a reader that lists
the folder between the merged file's write and the removal of its sources sees those events twice,
so reads of a run table drop exact duplicate rows.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from evoforge.data import home, schemas
from evoforge.data.atomic import atomic_path, commit, fsync_folder, leftovers, remove_leftovers
from evoforge.data.ids import stable_hash
from evoforge.data.manifest import (
    HISTORY_FOLDER, MANIFEST_NAME, PART_NAME, Manifest, ManifestError, Part, describe_part, new_part_name, part_damage,
    read_history, read_manifest, write_manifest,
)
from evoforge.data.runlock import check_run_lease
from evoforge.data.storage import (
    LakePath, is_remote, location, move, parquet_metadata, parquet_schema, read_parquet, remove_tree,
    write_parquet_object,
)

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA_FOLDER = "_schema"
SCHEMA_PART = "part-schema.parquet"
DAMAGED_FOLDER = "_damaged"
# parts an evoforge before manifests wrote: part-00000 (a whole stage), part-<16 hex> (one ingest source,
# the same key a manifest records for it now)
LEGACY_PART = re.compile(r"^part-(?:\d{5}|(?P<key>[0-9a-f]{16}))\.parquet$")

# A part closes at whichever bound it reaches first, so what a reader holds (one part's bytes at
# most, one row group at a time) and the objects per table do not depend on the round's size.
PART_MAX_ROWS = 1_000_000
PART_MAX_BYTES = 128 * 1024 * 1024  # written (compressed) bytes
# Rows are buffered into row groups of this size before they are written: the unit a reader decodes.
ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 16 * 1024 * 1024  # in-memory Arrow bytes
READ_BATCH_ROWS = 8_192
# Parts up to this size are fetched in one request and checksummed in memory; a larger one is
# checksummed as a stream first and then read row group by row group (a second pass over it).
WHOLE_PART_BYTES = 32 * 1024 * 1024
# More event files than this in a run table are merged into one: every stage start reads the events twice
# (open attempts, then the earlier executions), on object storage two requests per file.
RUN_TABLE_COMPACT_FILES = 16
# Rows of one key range held at once where a stream is brought into key order (`in_key_ranges`):
# how a stage sees a problem's rows together in a round of any size. A DuckDB sort, window or join
# over the whole round instead needs more memory as the round grows (a sort of 10M rollouts ran out
# of 128 MB), so stages run their SQL one range at a time (`sql_batches`), under this limit.
KEY_RANGE_ROWS = 32_768
# Boundaries are cut from at most this many keys per range of a long Arrow column, evenly spaced in its order:
# keys are content hashes, so the spacing samples their order fairly and a range holds its share within a few
# percent (1/sqrt(256)); sorting a 10M-rollout pool's 1.25M problem ids whole took ~1 s of a stage's own,
# unspread time, the sample of 78k ~0.05 s
BOUNDARY_KEYS_PER_RANGE = 256


def _spill_fanout() -> int:
    """Range files one spill pass keeps open (one stream's at a time; more ranges take another pass): half
    the files this process may open, 64 to 1,024 (a 10M-rollout round's 306 ranges in one pass here)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(64, min(1024, soft // 2))


SPILL_FANOUT = _spill_fanout()
SPILL_BLOCK_ROWS = 65_536  # rows a spill splits at once (~25 MB of rollouts with their texts)
SQL_MEMORY_LIMIT = "128MB"
# DuckDB's threads for one range's query: a window or join over a range spreads over the cores a stage has
# (pairs 1.2x on this 2-core machine); the memory limit holds for all of them together
SQL_THREADS = min(4, os.cpu_count() or 1)

Rows = Union[pa.Table, pa.RecordBatch]
# a table whole, or its rows as they are produced (an `Interleaved` producer may feed several tables)
TableSource = Union[pa.Table, Iterable[Rows], "Interleaved", "WrittenParts"]


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

    def __reduce__(self):  # raised in a worker process (data/spread.py), it crosses to the stage's whole
        return DamagedPart, (self.damage,)


@dataclass
class RunHealth:
    """What a run's folder holds beside its committed data (`Lake.inspect`)."""
    files: dict[str, list[LakePath]] = field(default_factory=dict)  # table -> healthy committed parts (+ schema file)
    damaged: list[Damage] = field(default_factory=list)
    unnamed: list[LakePath] = field(default_factory=list)  # files in table folders that no manifest lists
    leftovers: list[LakePath] = field(default_factory=list)  # temporary files and uncommitted parts of dead writers
    superseded: list[LakePath] = field(default_factory=list)  # parts only earlier versions list (kept until vacuum)
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
        self.discard = False  # an aborted part: what its writer still flushes goes nowhere

    def write(self, data) -> int:
        view = memoryview(data)
        if self.discard:
            return view.nbytes
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

    def __init__(self, stage_dir: LakePath, table: str, schema: pa.Schema, key: str | None, name: str | None = None):
        self.stage_dir, self.table, self.key = stage_dir, table, key
        self.file = f"{table}/{name or new_part_name()}"
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
        self._writer.write(rows, row_group_size=ROW_GROUP_ROWS)
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
        self._sink.discard = True
        try:
            self._writer.close()
        except Exception:
            pass
        try:
            self._raw.close()
        finally:
            (self.stage_dir / self.file).unlink(missing_ok=True)


class TableWriter:
    """One table of a stage's output as bounded parts: rows are buffered into row groups, and a part
    closes once it holds PART_MAX_ROWS rows or PART_MAX_BYTES written bytes (the row group that
    crosses the byte bound finishes it). A table with no rows still gets one empty part: the
    manifest then says the stage wrote it, empty. Its parts are named in the order they are written
    (one random prefix, then a sequence number): a manifest lists parts by name, so the table reads
    back in the order it was written (verify relies on a problem's rollouts staying together)."""

    def __init__(self, stage_dir: LakePath, table: str, schema: pa.Schema, key: str | None, order: int | None = None):
        self.stage_dir, self.table, self.schema, self.key = stage_dir, table, schema, key
        # `order`: the writer's place among several writing one table (data/spread.py: a block of ranges each),
        # first in the name, so the manifest lists their parts in that order
        self._prefix = new_part_name()[len("part-"):][:16]
        if order is not None:
            self._prefix = f"{order:06x}{self._prefix[6:]}"
        self.parts: list[Part] = []
        self._part: PartWriter | None = None
        self._buffer: list[pa.Table] = []
        self._buffered_rows = self._buffered_bytes = 0

    def write(self, rows: pa.Table) -> None:
        self._buffer.append(rows)
        self._buffered_rows += rows.num_rows
        self._buffered_bytes += rows.nbytes
        if self._buffered_rows >= ROW_GROUP_ROWS or self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        rows = pa.concat_tables(self._buffer) if self._buffer else self.schema.empty_table()
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        while rows.num_rows:
            if self._part is None:
                self._part = self._new_part()
            take = min(PART_MAX_ROWS - self._part.rows, ROW_GROUP_ROWS)  # one row group: then the bounds are checked
            self._part.write(rows.slice(0, take))
            rows = rows.slice(take)
            if self._part.rows >= PART_MAX_ROWS or self._part.bytes_written >= PART_MAX_BYTES:
                self.parts.append(self._part.close())
                self._part = None

    def close(self, empty_part: bool = True) -> list[Part]:
        """The parts written; `empty_part=False`: none for a table that got no rows (a spread stage's worker:
        the commit then writes the one empty part, if no worker wrote any)."""
        self._flush()
        if empty_part and self._part is None and not self.parts:
            self._part = self._new_part()
            self._part.write(self.schema.empty_table())
        if self._part is not None:
            self.parts.append(self._part.close())
            self._part = None
        return self.parts

    def _new_part(self) -> PartWriter:
        name = f"part-{self._prefix}{len(self.parts):016x}.parquet"
        return PartWriter(self.stage_dir, self.table, self.schema, self.key, name)

    def abort(self) -> None:
        """Remove what this writer wrote: nothing names it yet (no manifest was written)."""
        if self._part is not None:
            self._part.abort()
            self._part = None
        for part in self.parts:
            (self.stage_dir / part.file).unlink(missing_ok=True)
        self.parts = []


def _pieces(source: TableSource) -> Iterator[pa.Table]:
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        source = [source]
    for rows in source:
        yield _table(rows)


def _table(rows: Rows) -> pa.Table:
    return pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows


class Interleaved:
    """The rows of several output tables from one producer, as (table, rows) pairs in any order: what a
    stage gives each of those tables when one pass over its inputs makes them all (pairs: `pairs` and
    `sft_examples`), so no input is read once per output. `Lake.publish` writes every table's parts
    as its rows come."""

    def __init__(self, rows: Iterable[tuple[str, Rows]]):
        self.rows = rows

    def __iter__(self) -> Iterator[tuple[str, Rows]]:
        return iter(self.rows)

    def close(self) -> None:
        _close(self.rows)


@dataclass(frozen=True)
class WrittenParts:
    """A table's parts that other processes wrote into the stage folder and that no manifest lists yet
    (data/spread.py: the workers of a spread stage), in the order they are to be listed: `Lake.publish`
    commits them with the rest, or removes them when the commit fails. `more`: rows this process adds after
    them (pairs: the step pairs of the search trees), written under names that sort after the workers'."""
    parts: tuple[Part, ...]
    more: TableSource | None = None

    AFTER_WORKERS = 0xFFFFFF  # the `order` of the committing process's own parts (TableWriter)


def _close(source: TableSource) -> None:
    """Stop a producer that will not be read to its end (a generator holding a grader pool)."""
    close = getattr(source, "close", None)
    if close is not None and not isinstance(source, pa.Table):
        try:
            close()
        except Exception:
            pass


@dataclass(frozen=True)
class Published:
    """What a commit wrote: the output fingerprint (of its key's parts) and the new parts."""
    fingerprint: str | None
    parts: tuple[Part, ...]

    def rows(self, table: str) -> int:
        return sum(p.rows for p in self.parts if p.table == table)


class _OutputChanged(LakeError):
    """A writer committed (and removed the parts read so far) while a stage's output was streamed."""


def _missing(err: OSError) -> bool:
    return isinstance(err, FileNotFoundError) or "does not exist" in str(err) or "NoSuchKey" in str(err)


def drop_duplicate_rows(table: pa.Table) -> pa.Table:
    """`table` without exact duplicate rows (the first of each kept, in order): a run table's events
    read twice while they were being merged (`Lake.compact_run_table`)."""
    if table.num_rows < 2:
        return table
    index = "__row__"
    while index in table.column_names:
        index += "_"
    numbered = table.append_column(index, pa.array(range(table.num_rows), pa.int64()))
    firsts = numbered.group_by(table.column_names, use_threads=False).aggregate([(index, "min")])
    keep = pc.sort_indices(firsts[f"{index}_min"])
    return table.take(pc.take(firsts[f"{index}_min"], keep)) if firsts.num_rows < table.num_rows else table


# The run folders whose schema files this process has checked or written (`Lake.ensure_run`), by
# their str(): every Lake of the process shares it (the catalog builds its own).
_checked_runs: set[str] = set()


class Lake:
    def __init__(self, root: str | LakePath):
        self.root = location(root)  # a folder, or an s3:// prefix (data/storage.py)
        if is_remote(self.root):
            self.root.check_bucket()

    # -- paths ---------------------------------------------------------------------------------
    def run_dir(self, run: str) -> LakePath:
        if not RUN_NAME.fullmatch(run or ""):
            raise LakeError(
                f"run name {run!r} is not valid: use letters, digits, '-', '_' or '.', at most 64 characters"
            )
        return self.root / run

    def log_dir(self, run: str) -> Path:
        """Where the run's log files grow, line by line: runs/<run>/logs/ on disk; on object storage they stay on
        this machine, under the home's logs/runs/<run>/."""
        run_dir = self.run_dir(run)
        return Path(run_dir) / "logs" if not is_remote(run_dir) else home.home() / "logs" / "runs" / run

    def runs(self) -> list[str]:
        """The names of the runs under the lake's root."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)) \
            if self.root.is_dir() else []

    def existing_run_dir(self, run: str) -> LakePath:
        """The run's folder; LakeError listing the runs there when it does not exist."""
        run_dir = self.run_dir(run)
        if not run_dir.is_dir():
            runs = self.runs()
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

    def ensure_run(self, run: str, check: bool = False) -> LakePath:
        """Create the run folder with a zero-row schema file per table (see module doc), or renew one
        that is missing, damaged or of an older schema. Checked once per process and run (on object
        storage the check is two requests per file, and every commit and stage start asks): a file
        removed or damaged while this process runs is renewed by the next command, or now with `check`."""
        run_dir = self.run_dir(run)
        if not check and str(run_dir) in _checked_runs:
            return run_dir
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
        _checked_runs.add(str(run_dir))
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

    def table_rows(self, run: str, round: int, stage: str) -> dict[str, int]:
        """Committed rows per table of a stage, as its manifest lists them (nothing is read)."""
        rows: dict[str, int] = {}
        for part in (manifest.parts if (manifest := self.manifest(run, round, stage)) else ()):
            rows[part.table] = rows.get(part.table, 0) + part.rows
        return rows

    # -- reads ---------------------------------------------------------------------------------
    def read_schema(self, table: str, columns: list[str] | None = None) -> pa.Schema:
        """The schema of what `read` / `read_batches` give for `table` and `columns`."""
        schema = self._schema(table)
        if table not in schemas.RUN_TABLES:
            schema = schema.append(pa.field("round", pa.int32())).append(pa.field("stage", pa.string()))
        if columns is None:
            return schema
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise LakeError(f"table {table!r} has no column(s) {unknown}")
        return pa.schema([schema.field(c) for c in columns])

    def read(self, run: str, table: str, round: int | None = None, stage: str | None = None,
             exclude_key: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """All committed rows of `table` in the run (optionally one round / stage), with `round` and
        `stage` (the stage that wrote them) from the path, as the DuckDB views have them. Each part
        is checked against its manifest (size, checksum) as it is read: DamagedPart names a bad one.
        Whole in memory: for the small tables; a stage's large input streams (`read_batches`)."""
        for attempt in range(3):
            try:
                batches = list(self.read_batches(run, table, round, stage, exclude_key=exclude_key, columns=columns))
            except _OutputChanged:
                if attempt == 2:
                    raise
                continue
            return pa.Table.from_batches(batches, self.read_schema(table, columns))
        raise AssertionError("unreachable")

    def read_batches(self, run: str, table: str, round: int | None = None, stage: str | None = None, *,
                     exclude_key: str | None = None, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The committed rows of `table` (optionally one round / stage) as record batches of at most
        READ_BATCH_ROWS rows, part by part, each part checked against its manifest before any of its
        rows is yielded; `columns` projects (default: all, with `round` and `stage` as `read`
        gives them). Memory holds one part's bytes (bounded) or one row group, never the table."""
        schema = self.read_schema(table, columns)
        if table in schemas.RUN_TABLES:
            yield from self._read_run_table(run, table).select(schema.names).to_batches(READ_BATCH_ROWS)
            return
        for r, s, folder in self.stage_dirs(run, round, stage):
            yield from self._stage_batches(run, r, s, folder, table, exclude_key, schema)

    def reader(self, run: str, table: str, round: int | None = None, stage: str | None = None, *,
               exclude_key: str | None = None, columns: list[str] | None = None) -> pa.RecordBatchReader:
        """`read_batches` as an Arrow stream: what a stage hands its task for a large input."""
        return pa.RecordBatchReader.from_batches(
            self.read_schema(table, columns),
            self.read_batches(run, table, round, stage, exclude_key=exclude_key, columns=columns))

    def _stage_batches(self, run, round, stage, folder, table, exclude_key, schema) -> Iterator[pa.RecordBatch]:
        if not (folder / table).is_dir():  # the stage never wrote this table: its manifest is not ours to read
            return
        yielded = False
        for _attempt in range(3):  # a writer may commit (and remove the old parts) while we read
            manifest = self.manifest(run, round, stage)
            if manifest is None:
                return
            try:
                for part in manifest.parts:
                    if part.table == table and (exclude_key is None or part.key != exclude_key):
                        for batch in self._part_batches(run, round, stage, folder, part, schema):
                            yielded = True
                            yield batch
                return
            except DamagedPart:
                latest = self.manifest(run, round, stage)
                if latest is None or latest.commit == manifest.commit:
                    raise
                if yielded:  # rows of the old commit are out already: the caller must start again
                    raise _OutputChanged(f"{folder}: a new output was committed while it was read; read it again") from None
        raise LakeError(f"{folder}: the output kept changing while it was read; try again")

    def part_batches(self, run: str, round: int, stage: str, part: Part, columns: list[str],
                     share: tuple[int, int] = (0, 1)) -> Iterator[pa.RecordBatch]:
        """One committed part's rows, `columns` only: what a worker of a spread stage reads of an input
        (data/spread.py). `share` (k, n): the k-th of n slices of its row groups, so that several workers
        read one large part. The part is checked against its checksum before any row by the reader of
        slice 0; the reader of another slice checks it only when its row groups do not read (a damage the
        first reader names anyway: the stage fails and commits nothing)."""
        folder, schema = self.stage_dir(run, round, stage), self.read_schema(part.table, columns)
        if share == (0, 1) or share[0] == 0:
            return self._part_batches(run, round, stage, folder, part, schema, share)

        def checked_if_unreadable():
            try:
                yield from self._part_batches(run, round, stage, folder, part, schema, share, checksum=False)
            except (OSError, pa.ArrowException) as err:
                reason = part_damage(folder, part, checksum=True)
                if reason:
                    raise DamagedPart(Damage(run, folder / part.file, reason, round, stage)) from err
                raise

        return checked_if_unreadable()

    def read_parts(self, run: str, round: int, stage: str, parts: Iterable[Part], table: str) -> pa.Table:
        """The rows of the given parts of one stage folder (of any of its versions, data/history.py), each
        checked against its checksum as it is read."""
        folder, schema = self.stage_dir(run, round, stage), self._schema(table)
        batches = [batch for part in parts if part.table == table
                   for batch in self._part_batches(run, round, stage, folder, part, schema)]
        return pa.Table.from_batches(batches, schema)

    def version_batches(self, run: str, round: int, stage: str, parts: Iterable[Part], table: str) -> Iterator[pa.RecordBatch]:
        """`read_batches` over the given parts of one stage folder (one of its versions, data/history.py): the
        rows with `round` and `stage`, part by part, each part checked against its checksum before its rows."""
        folder, schema = self.stage_dir(run, round, stage), self.read_schema(table)
        for part in parts:
            if part.table == table:
                yield from self._part_batches(run, round, stage, folder, part, schema)

    def _part_batches(self, run, round, stage, folder: LakePath, part: Part, schema: pa.Schema,
                      share: tuple[int, int] = (0, 1), checksum: bool = True) -> Iterator[pa.RecordBatch]:
        path = folder / part.file
        try:
            if not checksum:
                reason = None
                source = path.open_input() if is_remote(path) else pa.OSFile(str(path))
            elif part.bytes <= WHOLE_PART_BYTES:
                data = path.read_bytes()
                reason = part_damage(folder, part, checksum=True, data=data)
                source = pa.BufferReader(data)
            else:
                reason = part_damage(folder, part, checksum=True)  # checksummed as a stream: never held whole
                source = path.open_input() if is_remote(path) else pa.OSFile(str(path))
        except OSError as err:
            if _missing(err):
                raise DamagedPart(Damage(run, path, "missing", round, stage)) from None
            raise
        if reason:
            raise DamagedPart(Damage(run, path, reason, round, stage))
        where = f"{folder}/{part.table}"
        from_path = {"round": pa.scalar(round, pa.int32()), "stage": pa.scalar(stage, pa.string())}
        with source:
            # no pre-buffering: it would fetch every row group of the part before the first batch
            parquet = pq.ParquetFile(source, pre_buffer=False)
            stored = set(parquet.schema_arrow.names)
            # a column added to the schema after the part was written reads as nulls
            wanted = [n for n in schema.names if n in stored and n not in from_path] or parquet.schema_arrow.names[:1]
            groups = parquet.num_row_groups
            row_groups = list(range(groups * share[0] // share[1], groups * (share[0] + 1) // share[1]))
            if not row_groups:
                return
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=row_groups, columns=wanted,
                                              use_threads=False):
                columns = []
                for field_ in schema:
                    if field_.name in from_path:
                        columns.append(pa.repeat(from_path[field_.name], batch.num_rows))
                    elif field_.name in stored:
                        columns.append(batch.column(field_.name))
                    else:
                        columns.append(pa.nulls(batch.num_rows, field_.type))
                try:
                    yield pa.RecordBatch.from_arrays(columns, schema=schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    rows = pa.Table.from_batches([pa.RecordBatch.from_arrays(
                        columns, names=schema.names)])  # differing types: cast, or name what does not fit
                    yield from schemas.conform(rows, schema, where=where).to_batches()

    def _read_run_table(self, run: str, table: str, files: list[LakePath] | None = None) -> pa.Table:
        """A run table's events, each once (see `drop_duplicate_rows`)."""
        schema = self._schema(table)
        parts = []
        for path in self.run_table_files(run, table) if files is None else files:
            try:
                rows = read_parquet(path)
            except FileNotFoundError:  # merged into a compacted file since the listing
                continue
            except Exception as err:
                raise DamagedPart(Damage(run, path, f"unreadable ({str(err).splitlines()[0][:120]})")) from None
            parts.append(schemas.conform(rows, schema, where=str(path), missing_as_null=True))
        return drop_duplicate_rows(pa.concat_tables(parts)) if parts else schema.empty_table()

    def run_table_files(self, run: str, table: str) -> list[LakePath]:
        folder = self.run_dir(run) / table
        return sorted(p for p in folder.glob("part-*.parquet") if PART_NAME.fullmatch(p.name))  # none when no folder

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

    def compact_run_table(self, run: str, table: str, above: int | None = None) -> int:
        """Merge a run table's files into one when there are more than `above` (RUN_TABLE_COMPACT_FILES);
        returns how many were merged. The merged file is written whole first, its sources removed
        after: a crash in between leaves each event twice, which reads drop (`_read_run_table`).
        Caller holds the run's lock, so no event is appended meanwhile."""
        files = self.run_table_files(run, table)
        if len(files) <= (RUN_TABLE_COMPACT_FILES if above is None else above):
            return 0
        write_parquet(self._read_run_table(run, table, files), self.run_dir(run) / table / new_part_name())
        for path in files:
            path.unlink(missing_ok=True)
        return len(files)

    def publish_stage(self, run: str, round: int, stage: str, tables: Mapping[str, TableSource],
                      key: str | None = None, config_hash: str | None = None) -> str | None:
        """Commit `tables` as the stage's output; returns the output fingerprint (of `key`'s parts)."""
        return self.publish(run, round, stage, tables, key, config_hash).fingerprint

    def publish(self, run: str, round: int, stage: str, tables: Mapping[str, TableSource],
                key: str | None = None, config_hash: str | None = None) -> Published:
        """Commit `tables` as the stage's output: each a table, or its rows (tables or record
        batches) as they are produced, written in bounded parts as they come (`TableWriter`); one
        `Interleaved` producer given for several tables feeds them all in one pass; `WrittenParts`, the
        parts other processes wrote (a spread stage's workers), are listed as they are.

        Without `key` the whole output is replaced; with one, only the parts of that key (ingest: one
        source). New parts first, then the manifest (the commit, a new version): a crash at any point
        leaves the old output or the new one, whole. The superseded parts stay, listed by the earlier
        versions (data/manifest.py, History) until `vacuum`. Callers hold the run's lock."""
        self.ensure_run(run)
        folder = self.stage_dir(run, round, stage)
        try:
            old = self.manifest(run, round, stage)
        except DamagedPart:
            if key is not None:  # the other inputs' parts are unknown: doctor --repair first
                raise
            old = None  # the whole output is replaced, the unreadable manifest with it
        writers: dict[str, TableWriter] = {}
        given = [part for source in tables.values() if isinstance(source, WrittenParts) for part in source.parts]
        try:
            for table, source in tables.items():  # nothing is written before a table's first rows
                if not isinstance(source, WrittenParts):
                    writers[table] = TableWriter(folder, table, self._schema(table), key)
                elif source.more is not None or not any(p.table == table for p in source.parts):
                    writers[table] = TableWriter(folder, table, self._schema(table), key, order=WrittenParts.AFTER_WORKERS)
            fed: set[int] = set()
            for table, source in tables.items():
                if isinstance(source, WrittenParts):
                    source = source.more if source.more is not None else ()
                if isinstance(source, Interleaved):
                    if id(source) in fed:
                        continue
                    fed.add(id(source))
                    for name, rows in source:
                        if name not in writers:
                            raise LakeError(f"{stage}: rows of table {name!r}, which this commit does not write")
                        writers[name].write(schemas.conform(_table(rows), writers[name].schema, where=f"{stage}/{name}"))
                    continue
                for rows in _pieces(source):
                    writers[table].write(schemas.conform(rows, writers[table].schema, where=f"{stage}/{table}"))
            written = given + [part for table, writer in writers.items() for part in writer.close(
                empty_part=not any(p.table == table for p in given))]
        except BaseException:
            for writer in writers.values():
                writer.abort()
            for part in given:
                (folder / part.file).unlink(missing_ok=True)
            for source in tables.values():
                _close(source)
            raise
        for table_folder in {(folder / p.file).parent for p in written}:
            fsync_folder(table_folder)
        kept = [p for p in (old.parts if old else ()) if key is not None and p.key != key]
        check_run_lease(self.run_dir(run))  # a holder whose S3 lease was taken over must not commit
        manifest = write_manifest(folder, kept + written, config_hash)  # the commit
        return Published(manifest.fingerprint(key), tuple(written))

    # -- health --------------------------------------------------------------------------------
    def inspect(self, run: str, checksum: bool = False, parts: bool = True) -> RunHealth:
        """Every committed part checked against its manifest (cheaply, or with checksums), the files no
        manifest lists, and the leftovers of dead writers. What status, sql and doctor report.
        `parts=False`: what lies beside the stage folders' committed parts (leftovers, superseded parts,
        unnamed files), no part checked and the run tables not looked at: what `sweep` needs at a
        stage start.

        What it reads does not grow with the run's history: per stage folder one listing and its
        current manifest, which names the parts of earlier versions still kept (`superseded`); the
        folder's earlier versions (`_history/`) are read only when it holds a part no manifest names
        there (a dead writer's leftover, or a folder last committed before manifests named them), and
        always for `doctor` (`checksum=True`), which names a damaged copy. The stage folders are listed a
        level at a time (`stage_dirs`), so the chunks of stages at work are never listed."""
        run_dir = self.run_dir(run)
        health = RunHealth()
        if parts:
            schema_files = {path.parent.name: path for path in (run_dir / "round=0" / SCHEMA_FOLDER).rglob(SCHEMA_PART)
                            if path.parent.parent.name == SCHEMA_FOLDER}  # one listing, not a request per table
            for name in schemas.ROUND_TABLES:
                health.files[name] = [schema_files[name]] if name in schema_files else []
        for round, stage, folder in self.stage_dirs(run):
            try:
                manifest = read_manifest(folder)
            except ManifestError as err:
                health.damaged.append(Damage(run, err.path, err.reason, round, stage))
                continue
            below = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
            listed = set()
            for part in manifest.parts if manifest else ():
                listed.add(part.file)
                if not parts:
                    continue
                reason = part_damage(folder, part, checksum=checksum, listed=below.get(part.file, False))
                if reason:
                    health.damaged.append(Damage(run, folder / part.file, reason, round, stage))
                elif part.table in health.files:
                    health.files[part.table].append(below[part.file])
            unlisted = [(relative, path) for relative, path in sorted(below.items())
                        if relative.count("/") == 1 and relative not in listed and not path.name.startswith(".")
                        and path.parent.name != HISTORY_FOLDER]
            # the parts of earlier versions the manifest names are superseded; another part (or any, for a
            # manifest written before it named them) is a leftover only if no version in `_history/` lists it
            earlier: set[str] | None = set(manifest.superseded or ()) if manifest else set()
            unknown = [relative for relative, path in unlisted if PART_NAME.fullmatch(path.name) and relative not in earlier]
            if checksum or unknown:
                try:
                    earlier |= {p.file for version in read_history(folder) for p in version.parts}
                except ManifestError as err:  # a damaged copy: what it listed is unknown, so nothing of it is swept
                    health.damaged.append(Damage(run, err.path, err.reason, round, stage))
                    earlier = None
            for relative, path in unlisted:
                if PART_NAME.fullmatch(path.name) and (earlier is None or relative in earlier):
                    health.superseded.append(path)
                elif PART_NAME.fullmatch(path.name):
                    health.leftovers.append(path)
                elif manifest is None and LEGACY_PART.fullmatch(path.name) and path.parent.name in schemas.ROUND_TABLES:
                    health.legacy.append(path)
                else:
                    health.unnamed.append(path)
        for table in schemas.RUN_TABLES if parts else ():
            folder = run_dir / table
            files = sorted(folder.glob("*"))  # nothing when the folder is not there
            health.files[table] = [path for path in files if path.name == SCHEMA_PART]
            for path in files:
                if path.name == SCHEMA_PART or path.name.startswith("."):
                    continue
                if not PART_NAME.fullmatch(path.name):
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
        """Remove what writers that died left behind: temporary files (data/atomic.py; on object storage
        the uploads they left unfinished, aborted) and parts no manifest lists under evoforge's part
        names; returns the count. Only while no writer of the run is alive (the caller holds the run's
        lock). A file with any other name is the user's: kept."""
        removed = remove_leftovers(self.run_dir(run))
        for path in self.inspect(run, parts=False).leftovers:
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
                parts.append(describe_part(folder, path.parent.name, target, LEGACY_PART.fullmatch(path.name)["key"]))
            check_run_lease(self.run_dir(run))
            write_manifest(folder, parts)
            lines.append(f"{folder.relative_to(self.run_dir(run))}: committed {len(parts)} part(s) written before "
                         f"manifests ({sum(p.rows for p in parts)} rows)")
        return lines

    def repair(self, run: str, damaged: list[Damage]) -> list[str]:
        """Move damaged files aside (runs/<run>/_damaged/<time>/...) and uncommit what they belong to:
        the whole output of a stage (its tables belong together), or for a stage committed one input
        at a time, that input's parts (the healthy ones stay, as an earlier version's). The stage then counts as not run: the next round or stage
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
                check_run_lease(self.run_dir(run))
                write_manifest(folder, kept)
            else:
                move_aside(folder / MANIFEST_NAME)
            what = f"the parts of input {entry.key}" if entry.key else "its output"
            lines.append(f"round {damage.round} {damage.stage}: moved {damage.path.name} aside and uncommitted "
                         f"{what} ({sum(p.rows for p in dropped)} rows); it will be recomputed")
        return lines


def key_boundaries(keys: Iterable[str] | pa.Array | pa.ChunkedArray, total_rows: int, range_rows: int | None = None
                   ) -> list[str]:
    """Where to split `in_key_ranges`: ranges of about equally many of `keys` (the keys the rows
    carry, e.g. the pool's problem ids), as many as it takes for a range to hold about `range_rows`
    (KEY_RANGE_ROWS) of `total_rows` rows; none when one range holds them all. Arrow keys are sorted
    in Arrow, and only the boundaries become Python strings: a pool of millions of problems costs
    its Arrow column, not millions of Python objects. Of a long Arrow column only an evenly spaced
    sample is sorted (`BOUNDARY_KEYS_PER_RANGE`): the same column gives the same boundaries."""
    ranges = -(-int(total_rows) // (range_rows or KEY_RANGE_ROWS))
    if ranges <= 1:
        return []
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.drop_null()
        sample = ranges * BOUNDARY_KEYS_PER_RANGE
        if len(keys) > 2 * sample:
            keys = keys.take(pa.array(range(0, len(keys), len(keys) // sample), pa.int64()))
        distinct = pc.unique(keys)
        count = len(distinct)
        if count < 2:
            return []
        ordered = distinct.take(pc.sort_indices(distinct))
        return sorted({ordered[count * i // ranges].as_py() for i in range(1, ranges)})
    keys = sorted(set(keys))
    if len(keys) < 2:
        return []
    return sorted({keys[len(keys) * i // ranges] for i in range(1, ranges)})


def in_key_ranges(streams: Mapping[str, pa.Table | Iterable[pa.RecordBatch]], key: str, boundaries: list[str]
                  ) -> Iterator[dict[str, pa.Table]]:
    """The rows of each stream range by range of `key`, in key order: split at `boundaries`, so all the
    rows of one key come in the same range (a range's rows are in no particular order: sort them).
    With more than one range the streams are spilled first, range by range, to local files under the
    project's .tmp (removed after): memory holds one range, disk the streams. What a stage does to
    see a problem's rows together, in problem order, in a round of any size."""
    if not boundaries:
        yield {name: _whole(source) for name, source in streams.items()}
        return
    if len(boundaries) + 1 <= SPILL_FANOUT:
        for ranged in _spilled(streams, key, boundaries):
            yield {name: reader.read_all() for name, reader in ranged.items()}
        return
    # more ranges than files one pass may keep open: spill into coarse ranges, then split each
    step = -(-(len(boundaries) + 1) // SPILL_FANOUT)
    coarse = boundaries[step - 1::step]
    for index, ranged in enumerate(_spilled(streams, key, coarse)):
        low, high = (coarse[index - 1] if index else None), (coarse[index] if index < len(coarse) else None)
        yield from in_key_ranges(ranged, key, [b for b in boundaries if (low is None or b > low) and (high is None or b < high)])


def _in_blocks(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """`batches` joined into batches of about `rows` rows: a spill over hundreds of ranges cuts each into a
    slice per range, and a reader's 8,192 rows would make slices of tens of rows, each a message to write,
    read back and scan."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        held.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]
            held, count = [], 0
    if count:
        yield pa.Table.from_batches(held).combine_chunks().to_batches()[0]


def _spilled(streams: Mapping[str, pa.Table | Iterable[pa.RecordBatch]], key: str, boundaries: list[str]
             ) -> Iterator[dict[str, pa.RecordBatchReader]]:
    """`in_key_ranges` through files: every stream written once, split by range; then each range's
    rows as one reader per stream, to be read before the next range is asked for."""
    folder = new_spill_folder()
    schemas_of: dict[str, pa.Schema | None] = {}
    try:
        for name, source in streams.items():
            schemas_of[name] = spill_by_range(source, key, boundaries, lambda index: folder / f"{name}-{index}.arrow")
        for index in range(len(boundaries) + 1):
            ranged, files = {}, []
            for name, schema in schemas_of.items():
                path = folder / f"{name}-{index}.arrow"
                if path.exists():
                    files.append(pa.OSFile(str(path)))
                    ranged[name] = pa.ipc.open_stream(files[-1])
                else:
                    schema = schema if schema is not None else pa.schema([])
                    ranged[name] = pa.RecordBatchReader.from_batches(schema, [])
            try:
                yield ranged
            finally:
                for file in files:
                    file.close()
                for name in schemas_of:
                    (folder / f"{name}-{index}.arrow").unlink(missing_ok=True)
    finally:
        remove_tree(folder)


def spill_by_range(source: pa.Table | Iterable[pa.RecordBatch], key: str, boundaries: list[str],
                   file_of: Callable[[int], Path]) -> pa.Schema | None:
    """Write `source`'s rows into one Arrow stream file per range of `key` (`file_of(range index)`, made at
    its first row; the rows of a range keep their order); returns the rows' schema (None: no batch and no
    schema to tell it)."""
    schema = getattr(source, "schema", None)
    writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
    try:
        for index, rows in range_slices(source, key, boundaries):
            schema = rows.schema
            if index not in writers:
                writers[index] = pa.ipc.new_stream(str(file_of(index)), rows.schema)
            writers[index].write_batch(rows)
    finally:
        for writer in writers.values():
            writer.close()
    return schema


def range_slices(source: pa.Table | Iterable[pa.RecordBatch], key: str, boundaries: list[str]
                 ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """`source`'s rows as (range index of `key` split at `boundaries`, rows of that range), in blocks of about
    SPILL_BLOCK_ROWS rows: each block sorted by range once, then a zero-copy slice per range (not a filter
    per range); the rows of a range keep their order."""
    import numpy as np

    splits = np.array(boundaries, dtype=str)
    split_bytes = np.array([b.encode() for b in boundaries], dtype=bytes)  # as wide as the longest
    for batch in _in_blocks(source.to_batches() if isinstance(source, pa.Table) else source, SPILL_BLOCK_ROWS):
        where = _ranges_of_keys(batch.column(key), splits, split_bytes)
        order = np.argsort(where, kind="stable")
        where, batch = where[order], batch.take(pa.array(order))
        starts = np.flatnonzero(np.diff(where, prepend=-1))
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(where)]):
            yield int(where[start]), batch.slice(start, end - start)


def _ranges_of_keys(keys: pa.Array, splits, split_bytes):
    """Each key's range index (how many boundaries are <= it). Keys of one byte length (content-hash ids) are
    compared as the fixed-width bytes of the column's own buffer, with no Python string made per key (~0.07
    µs a key against ~0.2 µs, range_slices included; at 10M rollouts the ranged stages split ~50M keys);
    UTF-8 bytes sort as the strings' code points do. Other keys go through NumPy strings."""
    import numpy as np

    if keys.type in (pa.string(), pa.large_string()) and keys.null_count == 0 and len(keys):
        offset_type = np.int32 if keys.type == pa.string() else np.int64
        offsets = np.frombuffer(keys.buffers()[1], offset_type, count=len(keys) + 1,
                                offset=keys.offset * np.dtype(offset_type).itemsize)
        width = int(offsets[1] - offsets[0])
        if width > 0 and (np.diff(offsets) == width).all():
            data = np.frombuffer(keys.buffers()[2], np.uint8, count=width * len(keys), offset=int(offsets[0]))
            if data.all():  # NumPy drops a fixed-width string's trailing NUL bytes: a key with one goes the other way
                return np.searchsorted(split_bytes, data.view(f"S{width}"), side="right")
    return np.searchsorted(splits, keys.to_numpy(zero_copy_only=False).astype(str), side="right")


def new_spill_folder() -> Path:
    """A new folder for one spill, named by host and process: the folders a killed process of this
    host left behind are removed first (another host's, on a shared home, are not ours to judge)."""
    import socket

    root = home.home() / ".tmp" / "spill"
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    for old in root.glob(f"{host}-*-*") if root.is_dir() else ():
        try:
            os.kill(int(old.name.rsplit("-", 2)[1]), 0)
        except ProcessLookupError:
            remove_tree(old)
        except (ValueError, PermissionError):
            pass
    folder = root / f"{host}-{os.getpid()}-{new_part_name()[len('part-'):][:16]}"
    folder.mkdir(parents=True)
    return folder


def fingerprint_rows(source: pa.Table | pa.RecordBatchReader) -> str:
    """Content hash of a table's or stream's rows, independent of their order (a multiset: the count
    and the sum of DuckDB's row hashes), read once in constant memory, with no sorted copy: what a stage's
    inputs are hashed with, held or streamed (`StageInputs`). It differs from `fingerprint_table`
    (data/ids.py), and DuckDB's hash may change with its version (the stages then run once more)."""
    rows = RowsFingerprint(source.schema)
    for batch in (source.to_batches() if isinstance(source, pa.Table) else source):
        rows.add(batch)
    return rows.value()


class RowsFingerprint:
    """`fingerprint_rows` taken batch by batch, as a stage's own pass over a stream goes by (flows/inputs.py
    `StageInputs`): the count and the sum of the row hashes add up over batches, so the value is the
    same however the rows were cut. Batches are hashed a row group at a time (ROW_GROUP_ROWS or
    ROW_GROUP_BYTES held): one DuckDB query per 8,192-row batch would cost five times the hashing."""

    QUERY = "SELECT count(*)::BIGINT, sum(hash({columns}))::VARCHAR FROM rows"

    def __init__(self, schema: pa.Schema):
        self.names = schema.names
        self.rows, self.total = 0, None
        self._query = self.QUERY.format(columns=", ".join('"' + n.replace('"', '""') + '"' for n in self.names))
        self._pending: list[pa.RecordBatch | pa.Table] = []
        self._pending_rows = self._pending_bytes = 0

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        if not batch.num_rows:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._hash()

    def _hash(self) -> None:
        if not self._pending:
            return
        rows = pa.Table.from_batches([b for p in self._pending for b in (p.to_batches() if isinstance(p, pa.Table) else [p])])
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        con = _hashing_connection()
        con.register("rows", rows)
        try:
            ((count, total),) = con.execute(self._query).fetchall()
        finally:
            con.unregister("rows")
        self.rows += count
        self.total = int(total) + (self.total or 0)

    def sums(self) -> tuple[int, int | None]:
        """The count and the sum of the row hashes so far: the shares of one stream that several processes
        read add up to the stream's (`value_of`)."""
        self._hash()
        return self.rows, self.total

    def value(self) -> str:
        return self.value_of(self.names, *self.sums())

    @staticmethod
    def value_of(names: list[str], rows: int, total: int | None) -> str:
        return stable_hash("rows", *names, rows, None if total is None else str(total))


_HASHING = threading.local()


def _hashing_connection():
    """This thread's DuckDB for `RowsFingerprint`, kept: a spread stage's worker hashes every reading task it
    takes, and a connection each cost ~15 ms (1.8 CPU-s of filter's workers at 10M rollouts). One per thread
    (a DuckDB connection is not for two threads at once) and per process (a forked child opens its own)."""
    held = getattr(_HASHING, "held", None)
    if held is None or held[0] != os.getpid():
        import duckdb

        held = _HASHING.held = (os.getpid(), duckdb.connect(":memory:", config={"threads": 1}))
    return held[1]


def _whole(source: pa.Table | Iterable[pa.RecordBatch]) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    batches = list(source)
    schema = getattr(source, "schema", None) or (batches[0].schema if batches else None)
    return pa.Table.from_batches(batches, schema) if schema is not None else pa.table({})


_SQL_DATABASES: dict[tuple[int, str], object] = {}


def duckdb_spill_root() -> Path:
    """Where DuckDB spills past its memory limit: `sql_batches`' database, and each query session's own
    folder beneath (data/catalog.py)."""
    spill = home.home() / ".tmp" / "duckdb"
    spill.mkdir(parents=True, exist_ok=True)
    return spill


def _sql_database():
    """This process's DuckDB for `sql_batches`, made once per home (a fork makes its own): opening one costs
    ~18 ms, a cursor on it ~1 ms, and a stage asks hundreds of queries of it, two per range of problems."""
    import duckdb

    spill = duckdb_spill_root()
    key = (os.getpid(), str(spill))
    if key not in _SQL_DATABASES:
        _SQL_DATABASES.clear()  # a parent's, inherited by a fork, or another home's: not ours to use
        _SQL_DATABASES[key] = duckdb.connect(":memory:", config={
            "memory_limit": SQL_MEMORY_LIMIT, "threads": SQL_THREADS, "temp_directory": str(spill),
            "preserve_insertion_order": False})
    return _SQL_DATABASES[key]


def sql_batches(query: str, batch_rows: int = READ_BATCH_ROWS, **inputs: pa.Table | pa.RecordBatchReader
                ) -> Iterator[pa.RecordBatch]:
    """The result of `query` in DuckDB over Arrow inputs named by keyword (tables, or streams scanned
    once as they arrive), in batches of `batch_rows`, on SQL_THREADS under SQL_MEMORY_LIMIT (past it DuckDB spills
    under the project's .tmp/duckdb, or fails: give it one key range of a round, not the round). An
    error an input raised while it was read (a damaged part) is raised as itself, not as DuckDB's text."""
    import duckdb

    failures: list[BaseException] = []

    def watched(source):
        if isinstance(source, pa.Table):
            return source

        def batches():
            try:
                yield from source
            except BaseException as err:
                failures.append(err)
                raise

        return pa.RecordBatchReader.from_batches(source.schema, batches())

    con = _sql_database().cursor()  # its own names, the database's limits
    try:
        for name, source in inputs.items():
            con.register(name, watched(source))
        try:
            yield from con.sql(query).to_arrow_reader(batch_rows)
        except (duckdb.Error, pa.ArrowException):
            if failures:
                raise failures[0] from None
            raise
    finally:
        con.close()


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
