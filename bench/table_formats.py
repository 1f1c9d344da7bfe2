"""Table formats for "a lake with history" (every commit a version, time travel, vacuum): evoforge's own
manifests vs Delta Lake (deltalake) vs Iceberg (pyiceberg, SqlCatalog on sqlite), measured on this machine.

    .venv/bin/python bench/table_formats.py                 # everything, about 2.5-3 min on 2 cores
    .venv/bin/python bench/table_formats.py --only 1,3,6     # some measures (numbers as below)

deltalake and pyiceberg are not evoforge dependencies: they are installed beside the venv, never in it,
and put at the end of sys.path here:

    .venv/bin/pip install --target .tmp/tableformats/site deltalake==1.6.6
    .venv/bin/pip install --no-deps --target .tmp/tableformats/site-ice pyiceberg==0.12.0 \\
        mmh3 pyroaring strictyaml tenacity zstandard      # its other dependencies are the venv's

One table, one schema for all three: evoforge's `rollouts` (problem_id string, sample_index int32, text,
mean_logprob float64 standing for the reward, and five more columns), text of random words.

Measures (each a function `measure_<n>_...`):
 1. commit latency on local disk: median and p90 of N small overwrites (1,000 rows, ~1,500-char text).
 2. a 1M-row table (200-char text): write time, bytes, and a DuckDB scan
    (count(*), avg(reward), count(distinct problem_id)) over the format's exact file list with
    read_parquet, and over the library's own Arrow dataset / stream registered in DuckDB.
 3. time travel (overwrite twice, read version 0) and vacuum.
 4. kill -9 during a 300k-row overwrite at a random moment, K seeds: does the table still read whole
    (the old version, or the new one if the kill came after the commit point), and what garbage (files
    no version references) is left?
 5. S3 (moto server, data/local_s3.py): commit, latency, HTTP requests per commit (from the moto
    server's request log), time travel; for Delta which storage setting commits; two concurrent
    writers of the same version.
 6. damage: one byte flipped (same size) in a data file, and a truncated data file: what a normal read
    does, and whether the format keeps a per-file checksum.

evoforge's candidate is `Lake.publish` with its history (data/manifest.py: a copy of each manifest under
`<stage>/_history/v<n>-<commit>.json`, superseded parts kept; data/history.py's vacuum).

Writes a markdown table (rows = measures, columns = formats) and notes to bench/out/table_formats.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

BENCH_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH_ROOT))  # bench/ beside evoforge: bench.s3_requests
SCRATCH = BENCH_ROOT / ".tmp" / "tableformats"
for site in ("site", "site-ice"):  # at the end: never shadows a package of the venv
    if (SCRATCH / site).is_dir():
        sys.path.append(str(SCRATCH / site))
os.environ.setdefault("EVOFORGE_HOME", str(SCRATCH / "home"))  # evoforge's scratch (uploads, spill) stays here

from evoforge.data import home  # noqa: E402

home.configure()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from evoforge.data.lake import Lake  # noqa: E402
from evoforge.data import manifest as manifest_module  # noqa: E402
from evoforge.data.manifest import MANIFEST_NAME, Part, read_manifest  # noqa: E402
from evoforge.data.schemas import ROLLOUTS  # noqa: E402

from bench.s3_requests import RequestLog  # noqa: E402

WORK = SCRATCH / "work"
warnings.filterwarnings("ignore", message="Delete operation did not match any records")  # pyiceberg, 1st overwrite
OUT = BENCH_ROOT / "bench" / "out" / "table_formats.md"
RUN, STAGE, TABLE = "bench", "generate", "rollouts"
HISTORY = "_history"
FORMATS = ("evoforge", "delta", "iceberg")
QUERY = "select count(*), avg(mean_logprob), count(distinct problem_id) from {source}"

LOAD_START = ""
RESULTS: dict[str, dict[str, str]] = {}  # row label -> format -> cell
ROW_ORDER: list[str] = []
NOTES: list[str] = []
ERRORS: list[str] = []


def put(row: str, fmt: str, cell: str) -> None:
    if row not in RESULTS:
        RESULTS[row] = {}
        ROW_ORDER.append(row)
    RESULTS[row][fmt] = cell


def error_text(err: BaseException, limit: int = 300) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).replace(str(WORK) + "/", "").replace(str(WORK)[1:] + "/", "").split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def record_error(where: str, err: BaseException) -> str:
    line = f"{where}: {error_text(err, 600)}"
    ERRORS.append(line)
    print("  ERROR", line, flush=True)
    return error_text(err, 120)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def latency_cell(times: list[float]) -> str:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return f"{ms(statistics.median(times))} / {ms(p90)}"


# -- data ------------------------------------------------------------------------------------------
def _vocabulary() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5,000 pseudo-words (2-9 letters) as one byte blob with a space after each: starts, lengths."""
    rng = np.random.default_rng(12345)
    lengths = rng.integers(2, 10, 5000)
    blob = rng.integers(97, 123, int(lengths.sum() + len(lengths))).astype(np.uint8)
    ends = np.cumsum(lengths + 1)
    blob[ends - 1] = 32
    return blob, ends - lengths - 1, lengths + 1


VOCAB = _vocabulary()


def text_blob(rng: np.random.Generator, size: int) -> bytes:
    """`size` bytes of space-separated words, Zipf-distributed like prose (compresses like text)."""
    blob, starts, lengths = VOCAB
    ids = (rng.zipf(1.2, size // 4 + 64) - 1) % len(starts)
    lens = lengths[ids]
    ends = np.cumsum(lens)
    keep = int(np.searchsorted(ends, size)) + 1
    ids, lens, ends = ids[:keep], lens[:keep], ends[:keep]
    index = np.repeat(starts[ids] - (ends - lens), lens) + np.arange(ends[-1])
    return blob[index[:size]].tobytes()


def rollouts(rows: int, text_chars: int, seed: int, tag: str = "v") -> pa.Table:
    """`rows` rows of the rollouts schema: 8 samples per problem, `text_chars` characters of text each."""
    rng = np.random.default_rng(seed)
    batches = []
    for start in range(0, rows, 65_536):
        n = min(65_536, rows - start)
        index = pa.array(np.arange(start, start + n, dtype=np.int64))
        text = pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, n * text_chars + 1, text_chars, dtype=np.int32)),
                                           pa.py_buffer(text_blob(rng, n * text_chars)))
        batches.append(pa.record_batch([
            pc.binary_join_element_wise(pa.scalar(f"{tag}-r"), pc.cast(index, pa.string()), ""),
            pc.binary_join_element_wise(pa.scalar("p"), pc.cast(pc.divide(index, 8), pa.string()), ""),
            pa.array(["bench@0"] * n),
            index,
            pc.cast(pc.bit_wise_and(index, 7), pa.int32()),
            text,
            pa.array(np.full(n, text_chars // 4, dtype=np.int32)),
            pa.array(["stop"] * n),
            pa.array(rng.normal(-0.5, 0.2, n)),
        ], schema=ROLLOUTS))
    return pa.Table.from_batches(batches, ROLLOUTS)


def conformed(table: pa.Table) -> pa.Table:
    """A read-back table in the written schema (libraries return large_string / string_view / other order)."""
    table = table.select(ROLLOUTS.names)
    return pa.table([pc.cast(table.column(f.name), f.type) for f in ROLLOUTS], schema=ROLLOUTS)


def same_rows(read: pa.Table, written: pa.Table) -> bool:
    if read.num_rows != written.num_rows:
        return False
    return conformed(read).sort_by("rollout_id").equals(conformed(written).sort_by("rollout_id"))


def local_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def file_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


# -- the three formats, one interface --------------------------------------------------------------
class EvoforgeTable:
    """`Lake.publish` with its history (data/manifest.py). `root`: a folder or s3://bucket/prefix."""
    label = "evoforge manifests + _history"

    def __init__(self, root: str):
        self.lake = Lake(root)
        self.folder = self.lake.stage_dir(RUN, 0, STAGE)
        self.history = self.folder / HISTORY

    def commit(self, table: pa.Table) -> None:
        self.lake.publish(RUN, 0, STAGE, {TABLE: table})

    def read(self) -> pa.Table:
        return self.lake.read(RUN, TABLE, 0, STAGE, columns=ROLLOUTS.names)

    def history_files(self) -> list:
        return [path for _, path in sorted(manifest_module.history_names(self.folder).items())]

    def version_parts(self) -> list[list[Part]]:
        """The parts of every version, oldest first."""
        return [list(m.parts) for m in manifest_module.read_history(self.folder)]

    def versions(self) -> int:
        return len(self.version_parts())

    def read_version(self, version: int) -> pa.Table:
        """A past version: the parts it lists, each checked (size, sha256) as it is read."""
        schema = self.lake.read_schema(TABLE, ROLLOUTS.names)
        batches = [b for part in self.version_parts()[version]
                   for b in self.lake._part_batches(RUN, 0, STAGE, self.folder, part, schema)]
        return pa.Table.from_batches(batches, schema)

    def current_files(self) -> list[str]:
        return [str(self.folder / p.file) for p in read_manifest(self.folder).parts]

    def referenced_files(self) -> set[str]:
        """Every file some version needs: the manifest, the history copies, the parts any of them lists."""
        found = {str(self.folder / MANIFEST_NAME)} | {str(f) for f in self.history_files()}
        manifest = read_manifest(self.folder)
        found |= {str(self.folder / p.file) for p in (manifest.parts if manifest else ())}
        for parts in self.version_parts():
            found |= {str(self.folder / p.file) for p in parts}
        return found

    def all_files(self) -> set[str]:
        return local_files(Path(self.folder))

    def vacuum(self) -> str:
        """Down to the current version: data/history.py's `plan_vacuum` + `apply_vacuum`."""
        from datetime import timedelta

        from evoforge.data.history import apply_vacuum, plan_vacuum

        apply_vacuum(plan_vacuum(self.lake, RUN, older_than=timedelta(0)))
        return "data/history.py plan_vacuum(older_than=0) + apply_vacuum (parts only; history copies kept, marked)"


class DeltaTableFormat:
    label = "Delta (deltalake 1.6.6)"

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None):
        self.uri, self.options = uri, storage_options

    def table(self, version: int | None = None):
        from deltalake import DeltaTable
        return DeltaTable(self.uri, version=version, storage_options=self.options)

    def commit(self, table: pa.Table, target=None) -> None:
        from deltalake import write_deltalake
        write_deltalake(target if target is not None else self.uri, table, mode="overwrite",
                        storage_options=self.options if target is None else None)

    def read(self) -> pa.Table:
        return self.table().to_pyarrow_table()

    def read_native(self) -> pa.Table:
        """deltalake's own (Rust / DataFusion) reader."""
        return pa.RecordBatchReader.from_stream(self.table().scan()).read_all()

    def versions(self) -> int:
        return self.table().version() + 1

    def read_version(self, version: int) -> pa.Table:
        return self.table(version).to_pyarrow_table()

    def current_files(self) -> list[str]:
        return [file_path(u) for u in self.table().file_uris()]

    def referenced_files(self) -> set[str]:
        """The committed log entries, the checkpoint files, and every file an `add` of any version names."""
        root = Path(self.uri)
        log = root / "_delta_log"
        found = set()
        for entry in log.iterdir():
            if re.fullmatch(r"\d{20}\.json", entry.name):
                found.add(str(entry))
                for line in entry.read_text().splitlines():
                    action = json.loads(line)
                    if "add" in action:
                        found.add(str(root / action["add"]["path"]))
            elif re.fullmatch(r"\d{20}\.checkpoint.*\.parquet|_last_checkpoint", entry.name):
                found.add(str(entry))
        return found

    def all_files(self) -> set[str]:
        return local_files(Path(self.uri))


class IcebergTableFormat:
    label = "Iceberg (pyiceberg 0.12.0, SqlCatalog on sqlite)"
    name = "bench.rollouts"

    def __init__(self, folder: Path, warehouse: str | None = None, properties: dict[str, str] | None = None):
        from pyiceberg.catalog.sql import SqlCatalog

        folder.mkdir(parents=True, exist_ok=True)
        self.warehouse = warehouse or f"file://{folder / 'warehouse'}"
        self.catalog = SqlCatalog("bench", uri=f"sqlite:///{folder / 'catalog.db'}", warehouse=self.warehouse,
                                  **(properties or {}))
        self.catalog.create_namespace_if_not_exists("bench")
        self.catalog.create_table_if_not_exists(self.name, schema=ROLLOUTS)

    def table(self):
        return self.catalog.load_table(self.name)

    def commit(self, table: pa.Table, target=None) -> None:
        (target or self.table()).overwrite(table)

    def read(self) -> pa.Table:
        return self.table().scan().to_arrow()

    def snapshots(self) -> list:
        return self.table().snapshots()

    def versions(self) -> int:
        return len(self.snapshots())

    def read_version(self, version: int) -> pa.Table:
        table = self.table()
        return table.scan(snapshot_id=table.snapshots()[version].snapshot_id).to_arrow()

    def current_files(self) -> list[str]:
        return [file_path(task.file.file_path) for task in self.table().scan().plan_files()]

    def referenced_files(self) -> set[str]:
        """The current metadata file and its log, and per snapshot its manifest list, manifests and data files."""
        table = self.table()
        found = {file_path(table.metadata_location)}
        found |= {file_path(e.metadata_file) for e in table.metadata.metadata_log}
        for snapshot in table.snapshots():
            found.add(file_path(snapshot.manifest_list))
            for manifest in snapshot.manifests(table.io):
                found.add(file_path(manifest.manifest_path))
                for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=False):
                    found.add(file_path(entry.data_file.file_path))
        return found

    def all_files(self) -> set[str]:
        return local_files(Path(file_path(self.warehouse)))


def local_format(fmt: str, name: str):
    folder = WORK / name / fmt
    if fmt == "evoforge":
        return EvoforgeTable(str(folder))
    if fmt == "delta":
        return DeltaTableFormat(str(folder))
    return IcebergTableFormat(folder)


# -- 1. commit latency ------------------------------------------------------------------------------
def measure_1_commit_latency(commits: int) -> None:
    print(f"1. {commits} commits of 1,000 rows (1,500-char text) on local disk", flush=True)
    data = [rollouts(1000, 1500, seed=i, tag=f"c{i}") for i in range(commits)]
    tables = {fmt: local_format(fmt, "latency") for fmt in FORMATS}
    timed = timed_commits(tables, data)
    for fmt, table in tables.items():
        times = timed[fmt][0]
        ok = same_rows(table.read(), data[-1])
        put(f"1. commit latency, local disk: median / p90 of {commits} × 1,000 rows", fmt, latency_cell(times))
        files = table.all_files()
        put(f"1b. files on disk after {commits} commits (all versions kept)", fmt,
            f"{len(files)} ({sum(os.path.getsize(f) for f in files) / 1e6:.0f} MB){'' if ok else ' READ WRONG'}")
        print(f"   {fmt}: {latency_cell(times)}, {len(files)} files", flush=True)


# -- 2. a 1M-row table and DuckDB ---------------------------------------------------------------------
def duckdb_time(con, source: str, repeat: int = 3) -> tuple[float, tuple]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = con.execute(QUERY.format(source=source)).fetchall()[0]
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def measure_2_million_rows(rows: int) -> None:
    import duckdb

    print(f"2. a {rows:,}-row table (200-char text): write, DuckDB scan", flush=True)
    data = rollouts(rows, 200, seed=7, tag="m")
    expected = (rows, None, rows // 8 + (rows % 8 > 0))
    label = f"{rows / 1e6:g}M" if rows >= 1e6 else f"{rows:,}"
    for fmt in FORMATS:
        table = local_format(fmt, "million")
        started = time.perf_counter()
        table.commit(data)
        written = time.perf_counter() - started
        files = table.current_files()
        size = sum(os.path.getsize(f) for f in files)
        codec = pq.ParquetFile(files[0]).metadata.row_group(0).column(5).compression
        groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in files)
        put(f"2. write {label} rows (200-char text): time; data files, bytes, codec, row groups", fmt,
            f"{written:.1f} s; {len(files)} file(s), {size / 1e6:.0f} MB, {codec}, {groups} row groups")
        con = duckdb.connect()
        # (a) the exact current file list from the format's metadata, scanned with read_parquet
        started = time.perf_counter()
        files = table.current_files()
        listing = time.perf_counter() - started
        seconds, result = duckdb_time(con, "read_parquet([" + ", ".join(f"'{f}'" for f in files) + "])")
        check = "" if result[0] == expected[0] and result[2] == expected[2] else f" WRONG {result}"
        put("2a. DuckDB read_parquet(exact file list): list files + scan (median of 3)", fmt,
            f"{ms(listing)} + {ms(seconds)}{check}")
        # (b) the library's own Arrow dataset / stream, registered in DuckDB
        cells = []
        try:
            if fmt == "delta":
                dt = table.table()
                con.register("ds", dt.to_pyarrow_dataset())
                seconds, result = duckdb_time(con, "ds")
                cells.append(f"to_pyarrow_dataset(): {ms(seconds)}{'' if result[0] == rows else f' WRONG {result}'}")
                started = time.perf_counter()
                con.register("st", pa.RecordBatchReader.from_stream(dt.scan(columns=["problem_id", "mean_logprob"])))
                result = con.execute(QUERY.format(source="st")).fetchall()[0]
                cells.append(f"scan() stream: {ms(time.perf_counter() - started)}{'' if result[0] == rows else ' WRONG'}")
            elif fmt == "iceberg":
                started = time.perf_counter()
                reader = table.table().scan(selected_fields=("problem_id", "mean_logprob")).to_arrow_batch_reader()
                con.register("st", reader)
                result = con.execute(QUERY.format(source="st")).fetchall()[0]
                cells.append(f"scan().to_arrow_batch_reader(): {ms(time.perf_counter() - started)}"
                             f"{'' if result[0] == rows else ' WRONG'}")
            else:
                started = time.perf_counter()
                reader = table.lake.reader(RUN, TABLE, 0, STAGE, columns=["problem_id", "mean_logprob"])
                con.register("st", reader)
                result = con.execute(QUERY.format(source="st")).fetchall()[0]
                cells.append(f"Lake.reader() stream, sha256 checked: {ms(time.perf_counter() - started)}"
                             f"{'' if result[0] == rows else ' WRONG'}")
        except Exception as err:  # noqa: BLE001
            cells.append(record_error(f"2b {fmt} Arrow registration in DuckDB", err))
        put("2b. DuckDB over the library's Arrow dataset / stream (stream: one pass)", fmt, "; ".join(cells))
        con.close()
        print(f"   {fmt}: write {written:.1f} s, scan {ms(seconds)}", flush=True)
    del data


# -- 3. time travel and vacuum -------------------------------------------------------------------------
def time_travel(table, note: str = "") -> str:
    """Commit v0, overwrite twice, read version 0 back: are its rows exactly v0's?"""
    v0, v1, v2 = (rollouts(1000 * (i + 1), 300, seed=100 + i, tag=f"t{i}") for i in range(3))
    for rows in (v0, v1, v2):
        table.commit(rows)
    first = table.read_version(0)
    current = table.read()
    ok = same_rows(first, v0) and same_rows(current, v2)
    return (f"{'correct' if ok else 'WRONG'}: v0 {first.num_rows:,} rows (expected 1,000), current "
            f"{current.num_rows:,} (expected 3,000); {table.versions()} versions{note}")


def measure_3_time_travel() -> None:
    print("3. time travel and vacuum", flush=True)
    for fmt in FORMATS:
        table = local_format(fmt, "timetravel")
        try:
            cell = time_travel(table)
            if fmt == "iceberg":
                ops = [s.summary.operation.value if s.summary else "?" for s in table.snapshots()]
                cell += f" (snapshots: {', '.join(ops)}: an overwrite is a delete + an append snapshot)"
        except Exception as err:  # noqa: BLE001
            cell = record_error(f"3 {fmt} time travel", err)
        put("3. time travel: 3 overwrites, read version 0", fmt, cell)
        # vacuum: keep only the current version, see what goes and whether v0 still reads
        before = table.all_files()
        try:
            started = time.perf_counter()
            if fmt == "evoforge":
                how = table.vacuum()
            elif fmt == "delta":
                table.table().vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
                how = "vacuum(retention_hours=0, enforce_retention_duration=False)"
            else:
                from datetime import datetime, timezone
                t = table.table()
                t.maintenance.expire_snapshots().older_than(datetime.now(timezone.utc)).commit()
                how = "maintenance.expire_snapshots().older_than(now): metadata only, no file deleted"
            took = time.perf_counter() - started
            after = table.all_files()
            try:
                table.read_version(0)
                v0 = "v0 still reads"
            except Exception as err:  # noqa: BLE001
                damage = getattr(err, "damage", None)
                v0 = f"v0 then: {type(err).__name__} ({damage.reason})" if damage else f"v0 then: {error_text(err, 90)}"
            unreferenced = len(table.all_files() - table.referenced_files())
            put("3b. vacuum to the current version", fmt,
                f"{how}; {ms(took)}; {len(before - after)} files removed, {len(after - before)} written, "
                f"{unreferenced} left that no version references; {v0}")
        except Exception as err:  # noqa: BLE001
            put("3b. vacuum to the current version", fmt, record_error(f"3b {fmt} vacuum", err))
        print(f"   {fmt}: {RESULTS[ROW_ORDER[-2]][fmt][:80]}", flush=True)


# -- 4. kill -9 during a commit ---------------------------------------------------------------------
def child_commit(fmt: str, folder: str, rows: int) -> None:
    """Run in a subprocess: commit the first `rows` rows of the prepared table as an overwrite."""
    table = {"evoforge": lambda: EvoforgeTable(folder), "delta": lambda: DeltaTableFormat(folder),
             "iceberg": lambda: IcebergTableFormat(Path(folder))}[fmt]()
    with pa.memory_map(str(WORK / "kill-rows.arrow")) as source:
        data = pa.ipc.open_file(source).read_all().slice(0, rows)
    target = table.table() if fmt == "iceberg" else None
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    table.commit(data) if target is None else table.commit(data, target)
    print(f"done {time.perf_counter() - started:.3f}", flush=True)


def start_child(fmt: str, folder: Path, rows: int) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, __file__, "--child", fmt, str(folder), str(rows)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        raise RuntimeError(f"child did not start: {line!r} {child.stderr.read()[-2000:]}")
    return child


def current_rows(table) -> int:
    if isinstance(table, EvoforgeTable):  # the normal read: every part checked against its sha256
        return sum(b.num_rows for b in table.lake.read_batches(RUN, TABLE, 0, STAGE, columns=["problem_id"]))
    if isinstance(table, DeltaTableFormat):
        return table.table().to_pyarrow_table(columns=["problem_id"]).num_rows
    return table.table().scan(selected_fields=("problem_id",)).to_arrow().num_rows


def measure_4_kill(kills: int, rows: int) -> None:
    print(f"4. kill -9 during a {rows:,}-row overwrite, {kills} times per format", flush=True)
    path = WORK / "kill-rows.arrow"
    data = rollouts(rows + kills + 1, 200, seed=9, tag="k")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, ROLLOUTS) as writer:
        writer.write_table(data)
    del data
    for fmt in FORMATS:
        folder = WORK / "kill" / fmt
        table = {"evoforge": lambda: EvoforgeTable(str(folder)), "delta": lambda: DeltaTableFormat(str(folder)),
                 "iceberg": lambda: IcebergTableFormat(folder)}[fmt]()
        child = start_child(fmt, folder, rows)  # calibration: the first version, committed whole
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate()
        if "done" not in out:
            put(f"4. kill -9 mid-commit ({kills}×, {rows // 1000}k-row overwrite): table after", fmt,
                record_error(f"4 {fmt} first commit", RuntimeError(err.strip().splitlines()[-1] if err.strip() else out)))
            continue
        duration = float(out.split()[-1])
        expected = rows
        outcomes, broken, garbage_runs = Counter(), [], 0
        garbage_before = set()
        for seed in range(kills):
            new_rows = rows + seed + 1
            delay = random.Random(seed).uniform(0, 1.2 * duration)
            child = start_child(fmt, folder, new_rows)
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(delay)
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()
            try:
                seen = current_rows(table)
                if seen == expected:
                    outcomes["old version whole"] += 1
                elif seen == new_rows:
                    outcomes["new version whole"] += 1
                    # the kill came after the commit point: the previous version must still time-travel
                    previous = table.versions() - (3 if fmt == "iceberg" else 2)  # iceberg: delete + append snapshots
                    if table.read_version(previous).num_rows != expected:
                        broken.append(f"seed {seed}: previous version wrong")
                    expected = new_rows
                else:
                    outcomes["wrong row count"] += 1
                    broken.append(f"seed {seed}: {seen} rows, expected {expected} or {new_rows}")
            except Exception as read_err:  # noqa: BLE001
                outcomes["read failed"] += 1
                broken.append(f"seed {seed} (kill at {delay:.2f} s): {error_text(read_err, 200)}")
            garbage = table.all_files() - table.referenced_files()
            if garbage - garbage_before:
                garbage_runs += 1
            garbage_before = garbage
        garbage = sorted(table.all_files() - table.referenced_files())
        size = sum(os.path.getsize(g) for g in garbage)
        kinds = Counter(_garbage_kind(Path(g)) for g in garbage)
        put(f"4. kill -9 mid-commit ({kills}×, {rows // 1000}k-row overwrite): table after", fmt,
            f"commit takes {duration:.2f} s; " + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())) +
            (f"; BROKEN: {'; '.join(broken)}" if broken else "; never broken"))
        put("4b. garbage left (files no version references)", fmt,
            f"{len(garbage)} files, {size / 1e6:.0f} MB, from {garbage_runs} of {kills} kills"
            + (f" ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})" if garbage else ""))
        put("4c. what finds / removes that garbage", fmt, _reclaim(fmt, table, set(garbage)))
        for line in broken:
            NOTES.append(f"4 {fmt}: {line}")
        print(f"   {fmt}: {dict(outcomes)}; garbage {len(garbage)} files", flush=True)


def _garbage_kind(path: Path) -> str:
    name = path.name
    if name.endswith(".parquet") and "metadata" not in path.parts:
        return "data parquet"
    if name.startswith("."):
        return "temp file"
    if "_delta_log" in path.parts:
        return "log temp"
    if name.endswith(".avro"):
        return "manifest avro"
    if name.endswith(".metadata.json"):
        return "metadata json"
    return name.rsplit(".", 1)[-1]


def _reclaim(fmt: str, table, garbage: set[str]) -> str:
    if fmt == "evoforge":
        health = table.lake.inspect(RUN)
        found = {str(p) for p in health.leftovers}
        wrong = found - garbage  # parts some version still lists, which a sweep would remove
        return (f"Lake.inspect().leftovers finds {len(found & garbage)} of {len(garbage)} (`Lake.sweep` removes them)"
                + (f"; it also counts {len(wrong)} parts a version still lists: sweep would break time travel"
                   if wrong else "; no part a version lists among them"))
    if fmt == "delta":
        dt = table.table()
        listed = {file_path(p) if p.startswith(("/", "file:")) else str(Path(table.uri) / p)
                  for p in dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True,
                                     keep_versions=list(range(dt.version() + 1)))}
        return (f"vacuum(full=True, keep_versions=all, dry_run) lists {len(listed & garbage)} of {len(garbage)} "
                f"(+{len(listed - garbage)} others); files starting with _ or . (log temps) are never vacuumed")
    return ("nothing in pyiceberg 0.12 (no remove_orphan_files; expire_snapshots deletes no file); "
            "needs a custom orphan sweep like this bench's")


# -- 5. S3 via moto --------------------------------------------------------------------------------------
def timed_commits(tables: dict, data: list[pa.Table], requests: RequestLog | None = None
                  ) -> dict[str, tuple[list[float], list[int], Counter]]:
    """Commit each of `data` to every table in turn (interleaved, so a load that comes and goes on this
    shared machine weighs on every format alike): per format its times, requests per commit, last mix."""
    found = {fmt: ([], [], Counter()) for fmt in tables}
    for rows in data:
        for fmt, table in tables.items():
            mark = requests.mark() if requests else 0
            started = time.perf_counter()
            table.commit(rows)
            found[fmt][0].append(time.perf_counter() - started)
            if requests:
                seen = requests.since(mark)
                found[fmt][1].append(sum(seen.values()))
                found[fmt][2].clear()
                found[fmt][2].update(seen)
    return found


def s3_cell(times: list[float], counts: list[int], mix: Counter) -> str:
    return (f"{latency_cell(times)}; requests/commit: median {statistics.median(counts):.0f}, first {counts[0]}, "
            f"last {counts[-1]} (last: {', '.join(f'{n} {m}' for m, n in mix.most_common())})")


def measure_5_s3(commits: int) -> None:
    from evoforge.data.local_s3 import LocalS3

    print(f"5. S3 on a moto server: commits, {commits} timed per format", flush=True)
    log = WORK / "moto.log"
    with LocalS3(log_path=log) as s3:
        os.environ.update(s3.environment())
        s3.create_bucket("tablefmt")
        requests = RequestLog(log)
        timed = {"evoforge": _s3_evoforge(s3, requests), "delta": _s3_delta(s3, requests),
                 "iceberg": _s3_iceberg(s3, requests)}
        timed = {fmt: t for fmt, t in timed.items() if t is not None}
        evoforge = timed.get("evoforge")
        data = [rollouts(1000, 1500, seed=i, tag=f"s{i}") for i in range(commits)]
        from evoforge.data.runlock import run_lock
        # evoforge's writer holds the run lease, as a stage does: each publish checks it (one conditional PUT)
        with run_lock(evoforge[0].lake.run_dir(RUN), "bench") if evoforge else contextlib.nullcontext():
            results = timed_commits({fmt: t[0] for fmt, t in timed.items()}, data, requests)
        for fmt, (times, counts, mix) in results.items():
            extra = timed[fmt][1]
            put(f"5a. S3 commit latency median / p90 ({commits} × 1,000 rows, interleaved); HTTP requests per commit",
                fmt, s3_cell(times, counts, mix) + extra)


def _s3_evoforge(s3, requests: RequestLog):
    """Commit, time travel, two writers; returns (table to time, cell suffix, requests of ensure_run)."""
    from evoforge.data.lease import S3Lease

    fmt = "evoforge"
    table = EvoforgeTable("s3://tablefmt/evo")
    table.lake.ensure_run(RUN)
    mark = requests.mark()
    table.lake.ensure_run(RUN, check=True)  # what a process's first commit to a run adds, once
    ensure = sum(requests.since(mark).values())
    try:
        table.commit(rollouts(100, 50, seed=1, tag="a"))
        put("5. S3 (moto): does it commit; setting needed", fmt, "yes; no setting (a PUT of _manifest.json is the commit)")
        put("5b. S3 time travel (3 overwrites, read v0)", fmt, time_travel(EvoforgeTable("s3://tablefmt/evo-tt")))
    except Exception as err:  # noqa: BLE001
        put("5. S3 (moto): does it commit; setting needed", fmt, record_error("5 evoforge S3", err))
        return None
    # two writers of one run: the lease refuses the second; publish alone would let the last PUT win
    run_dir = str(table.lake.run_dir("race"))
    first = S3Lease(run_dir, "writer A").acquire()
    try:
        S3Lease(run_dir, "writer B").acquire()
        lease = "second taker NOT refused"
    except Exception as err:  # noqa: BLE001
        lease = f"second taker refused ({type(err).__name__})"
    finally:
        first.release()
    racer = EvoforgeTable("s3://tablefmt/evo-race")
    racer.commit(rollouts(10, 50, seed=1, tag="base"))
    outcome = _race([lambda: racer.commit(rollouts(100, 50, seed=2, tag="A")),
                     lambda: racer.commit(rollouts(200, 50, seed=3, tag="B"))])
    current = racer.read().num_rows
    put("5c. two concurrent writers of the same version", fmt,
        f"run lease (If-None-Match PUT): {lease}; without it both publish calls {outcome} and the last "
        f"manifest PUT wins (current: {current} rows)")
    return (table, f" (incl. the lease check; a process's first commit to a run also checks its 18 schema files, "
                   f"{ensure} requests, once)", ensure)


def _race(jobs) -> str:
    results = _threads(jobs)
    return "succeeded" if all(r == "ok" for r in results) else " / ".join(
        "ok" if r == "ok" else error_text(r, 160) for r in results)


def _s3_delta(s3, requests: RequestLog):
    """Which storage setting commits, two writers; returns (table to time with the first that works, suffix)."""
    fmt = "delta"
    base = {"AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"], "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true"}
    settings = {"default (no locking option)": {}, "conditional_put=etag": {"conditional_put": "etag"},
                "AWS_S3_ALLOW_UNSAFE_RENAME=true": {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}}
    working, lines, races = None, [], []
    for i, (name, extra) in enumerate(settings.items()):
        table = DeltaTableFormat(f"s3://tablefmt/delta-{i}", {**base, **extra})
        try:
            table.commit(rollouts(100, 50, seed=1, tag="a"))
            mark = requests.mark()
            table.commit(rollouts(200, 50, seed=2, tag="b"))
            writes = [f"{m} {t.rsplit('/', 1)[-1].split('?')[0]}" for m, t, _ in requests.entries(mark)
                      if m in ("PUT", "POST", "DELETE") and "_delta_log" in t]
            ok = table.read_version(0).num_rows == 100 and table.read().num_rows == 200
            lines.append(f"{name}: commits{'' if ok else ' (READ WRONG)'}, log writes of a commit: "
                         f"{', '.join(writes) or 'none'}")
            working = working or (name, extra)
            races.append(f"{name}: {_delta_race(table, requests)}")
        except Exception as err:  # noqa: BLE001
            lines.append(f"{name}: {record_error(f'5 delta S3 [{name}]', err)}")
    put("5. S3 (moto): does it commit; setting needed", fmt, "; ".join(lines))
    put("5c. two concurrent writers of the same version", fmt, "; ".join(races))
    if working is None:
        return None
    name, extra = working
    put("5b. S3 time travel (3 overwrites, read v0)", fmt,
        time_travel(DeltaTableFormat("s3://tablefmt/delta-tt", {**base, **extra})))
    return DeltaTableFormat("s3://tablefmt/delta-timed", {**base, **extra}), f" [{name}]"


def _threads(jobs) -> list:
    """Run `jobs` at once (threads released by a barrier); each one's "ok" or its exception."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(i):
        barrier.wait()
        try:
            jobs[i]()
            results[i] = "ok"
        except Exception as err:  # noqa: BLE001
            results[i] = err
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _delta_race(table: DeltaTableFormat, requests: RequestLog, overwrites: int = 6, appends: int = 10) -> str:
    """Two writers commit at once (threads, a barrier). Overwrites from the same loaded version: one must be
    refused. Appends: both may commit (the loser of the commit-file PUT retries at the next version), but
    none may be lost: rows = all appended rows, one version per success. The commit-file PUTs refused with
    412 (If-None-Match) are counted from the server's log."""
    refused, lost, both, errors = 0, 0, 0, Counter()
    mark = requests.mark()
    for r in range(overwrites):
        start = table.table().version()
        handles = [table.table(), table.table()]
        results = _threads([lambda i=i: table.commit(rollouts(50 + i, 20, seed=r * 2 + i, tag=f"o{r}{i}"),
                                                     target=handles[i]) for i in range(2)])
        advanced, oks = table.table().version() - start, results.count("ok")
        if oks == 1 and advanced == 1:
            refused += 1
            errors[next(error_text(x, 110) for x in results if x != "ok")] += 1
        elif oks == 2 and advanced == 1:
            lost += 1
        elif oks == 2 and advanced == 2:
            both += 1
        else:
            errors[f"{oks} ok, +{advanced} versions: {[error_text(x, 80) for x in results if x != 'ok']}"] += 1
    from deltalake import write_deltalake
    rows_before, version_before, appended, append_ok = table.read().num_rows, table.table().version(), 0, 0
    for r in range(appends):
        batches = [rollouts(5 + i, 20, seed=100 + r * 2 + i, tag=f"a{r}{i}") for i in range(2)]
        results = _threads([lambda b=b: write_deltalake(table.uri, b, mode="append", storage_options=table.options)
                            for b in batches])
        append_ok += results.count("ok")
        appended += sum(b.num_rows for b, x in zip(batches, results) if x == "ok")
    rows_after, versions = table.read().num_rows, table.table().version() - version_before
    seen = requests.since(mark)
    text = f"overwrites: {refused}/{overwrites} one refused"
    if both:
        text += f", {both} both committed"
    if lost:
        text += f", {lost} LOST (both ok, one version)"
    text += (f"; appends: {append_ok}/{2 * appends} ok, {versions} versions, rows {rows_after - rows_before} of "
             f"{appended} ({'none lost' if rows_after - rows_before == appended and versions == append_ok else 'LOST'}); "
             f"{seen.get('412', 0)} commit PUTs refused with 412")
    for e in errors:
        NOTES.append(f"5c delta overwrite race, the loser's error: {e}")
    return text


def _s3_iceberg(s3, requests: RequestLog):
    """Commit, time travel, two writers; returns (table to time, suffix)."""
    fmt = "iceberg"
    props = {"s3.endpoint": s3.url, "s3.access-key-id": os.environ["AWS_ACCESS_KEY_ID"],
             "s3.secret-access-key": os.environ["AWS_SECRET_ACCESS_KEY"], "s3.region": "us-east-1"}
    try:
        table = IcebergTableFormat(WORK / "s3-iceberg", "s3://tablefmt/ice", props)
        table.commit(rollouts(100, 50, seed=1, tag="a"))
        put("5. S3 (moto): does it commit; setting needed", fmt,
            "yes; the commit is a compare-and-swap of metadata_location in the SQL catalog (sqlite here: one machine "
            "only; several machines need a shared catalog: Postgres, REST, Glue)")
        put("5b. S3 time travel (3 overwrites, read v0)", fmt,
            time_travel(IcebergTableFormat(WORK / "s3-iceberg-tt", "s3://tablefmt/ice-tt", props)))
        # two writers load the same metadata, both overwrite
        a, b = table.table(), table.table()
        a.overwrite(rollouts(10, 20, seed=1, tag="A"))
        try:
            b.overwrite(rollouts(20, 20, seed=2, tag="B"))
            outcome = "second writer NOT refused"
        except Exception as err:  # noqa: BLE001
            outcome = f"second writer refused: {error_text(err, 140)}"
        race = _race([lambda: table.commit(rollouts(30, 20, seed=3, tag="C")),
                      lambda: table.commit(rollouts(40, 20, seed=4, tag="D"))])
        put("5c. two concurrent writers of the same version", fmt,
            f"stale handles, one after the other: {outcome}; two threads at once: {race}")
        return IcebergTableFormat(WORK / "s3-iceberg-timed", "s3://tablefmt/ice-timed", props), \
            " (+ the sqlite catalog's transaction)"
    except Exception as err:  # noqa: BLE001
        put("5. S3 (moto): does it commit; setting needed", fmt, record_error("5 iceberg S3", err))
        return None


# -- 6. damage ------------------------------------------------------------------------------------------
def classify(read, written: pa.Table) -> str:
    try:
        rows = read()
    except Exception as err:  # noqa: BLE001
        return "error: " + error_text(err, 150)
    if same_rows(rows, written):
        return "correct rows"
    differ = rows.num_rows != written.num_rows
    return f"SILENTLY WRONG ({'row count ' + str(rows.num_rows) if differ else 'same count, changed values'})"


def measure_6_damage(flips: int) -> None:
    print(f"6. damage: a flipped byte (middle + {flips} random places), a truncated file", flush=True)
    data = rollouts(1000, 1500, seed=3, tag="d")
    checksums = {"evoforge": "yes: sha256 + size + rows per part in _manifest.json, checked on every stage read "
                             "(`evoforge sql` / inspect without checksum: size, footer, rows only)",
                 "delta": "no: size (+ column stats) per file in the log; no checksum",
                 "iceberg": "no: file_size_in_bytes + record_count (+ column stats) per file; no checksum"}
    for fmt in FORMATS:
        table = local_format(fmt, "damage")
        table.commit(data)
        target = Path(table.current_files()[0])
        original = target.read_bytes()
        footer = int.from_bytes(original[-8:-4], "little") + 8
        readers = {"read": table.read}
        if fmt == "delta":
            readers = {"to_pyarrow_table": table.read, "scan() (Rust)": table.read_native}

        def damaged(content: bytes) -> dict[str, str]:
            target.write_bytes(content)
            try:
                return {name: classify(read, data) for name, read in readers.items()}
            finally:
                target.write_bytes(original)

        def flip(at: int) -> bytes:
            changed = bytearray(original)
            changed[at] ^= 0xFF
            return bytes(changed)

        middle = damaged(flip(len(original) // 2))
        put("6a. one byte flipped in the middle of a data file (same size): normal read", fmt,
            "; ".join(f"{k}: {v}" for k, v in middle.items()))
        rng = random.Random(6)
        tally: dict[str, Counter] = {name: Counter() for name in readers}
        for _ in range(flips):
            for name, outcome in damaged(flip(rng.randrange(4, len(original) - footer))).items():
                tally[name]["error" if outcome.startswith("error") else
                            "silently wrong" if outcome.startswith("SILENTLY") else "read correct"] += 1
        put(f"6b. {flips} random single-byte flips in the data pages", fmt,
            "; ".join(f"{name}: " + ", ".join(f"{n} {k}" for k, n in t.most_common()) for name, t in tally.items()))
        truncated = damaged(original[: len(original) // 2])
        put("6c. data file truncated to half: normal read", fmt, "; ".join(f"{k}: {v}" for k, v in truncated.items()))
        put("6d. per-file checksum kept by the format", fmt, checksums[fmt])
        print(f"   {fmt}: middle {middle}; random {dict((k, dict(v)) for k, v in tally.items())}", flush=True)


# -- report -------------------------------------------------------------------------------------------------
def report(args, elapsed: float) -> str:
    labels = {"evoforge": EvoforgeTable.label, "delta": DeltaTableFormat.label, "iceberg": IcebergTableFormat.label}
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["# Table formats for a lake with history: measured", "",
             f"Machine: {os.cpu_count()} cores, local disk, moto 5.2.5 server as S3; pyarrow {pa.__version__}; "
             f"bench/table_formats.py, {elapsed:.0f} s wall. N: {args.commits} small commits, "
             f"{args.million:,}-row table, {args.kills} kills of a {args.kill_rows:,}-row overwrite, "
             f"{args.flips} random flips. Load average at start / end: {LOAD_START} / "
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (the 2 cores are shared with other sessions' test "
             "runs: timings interleave the formats where they are compared, and vary run to run).", "",
             "| measure | " + " | ".join(labels[f] for f in FORMATS) + " |",
             "|---|" + "---|" * len(FORMATS)]
    for row in sorted(ROW_ORDER, key=lambda r: r.split(" ", 1)[0]):  # "1.", "1b.", "2.", ...
        lines.append(f"| {esc(row)} | " + " | ".join(esc(RESULTS[row].get(f, "—")) for f in FORMATS) + " |")
    evoforge_mode = (
        "data/manifest.py `write_manifest`: lists `_history/`, reads the current manifest, PUTs `_manifest.json` (the "
        "commit) then its copy `_history/v<n>-<commit>.json`; superseded parts kept; vacuum = data/history.py")
    lines += ["", "Notes:", "",
              f"- evoforge column: {evoforge_mode}. Every stage read of evoforge data checks each part's sha256.",
              "- The same table in all three: evoforge's `rollouts` schema; `mean_logprob` plays the reward. Each "
              "format writes with its defaults (evoforge zstd, 65,536-row groups).",
              "- Commit = an overwrite of the whole table (a stage's output replaced). pyiceberg's `overwrite` makes two "
              "snapshots (delete, then append) in one metadata commit; its commit time includes `load_table`.",
              "- Garbage = files under the table's folder that no version (current manifest / _history, Delta log "
              "entries, Iceberg metadata log + snapshots) references.",
              "- S3 = evoforge's LocalS3 (moto server in a child process, data/local_s3.py) rather than an in-process "
              "ThreadedMotoServer: the server then does not share the GIL with the writers, and its request log gives "
              "the HTTP requests per commit. No network latency: real S3 adds ~10-30 ms per sequential request.",
              "- Delta on S3: under each setting tried, a commit writes its log entry with one PUT of "
              "`_delta_log/<version>.json` (no temporary object, no copy), and in the races moto answered 412 to the "
              "losing writer's PUT, which then retried at the next version (appends) or failed its conflict check "
              "(overwrites): deltalake 1.6.6 uses S3's conditional PUT (If-None-Match) by itself; neither "
              "`conditional_put=etag` nor `AWS_S3_ALLOW_UNSAFE_RENAME=true` is needed or changes what it sends. "
              "(`AWS_ALLOW_HTTP=true` is needed for moto's http endpoint.)",
              "- Delta requests per commit grow with the log: each `write_deltalake(uri)` replays every JSON commit "
              "since the last checkpoint (one every 100 commits by default)."]
    lines += [f"- {n}" for n in dict.fromkeys(NOTES)]
    if ERRORS:
        lines += ["", "Errors met (exact):", ""] + [f"- {e}" for e in ERRORS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="1,2,3,4,5,6", help="measures to run, e.g. 1,3")
    parser.add_argument("--commits", type=int, default=30)
    parser.add_argument("--million", type=int, default=1_000_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill-rows", type=int, default=300_000)
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--child", nargs=3, metavar=("FORMAT", "FOLDER", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_commit(args.child[0], args.child[1], int(args.child[2]))
        return
    only = {int(x) for x in args.only.split(",")}
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    started = time.perf_counter()
    global LOAD_START
    LOAD_START = " ".join(f"{x:.1f}" for x in os.getloadavg())
    steps = [(1, lambda: measure_1_commit_latency(args.commits)), (2, lambda: measure_2_million_rows(args.million)),
             (3, measure_3_time_travel), (4, lambda: measure_4_kill(args.kills, args.kill_rows)),
             (5, lambda: measure_5_s3(args.commits)), (6, lambda: measure_6_damage(args.flips))]
    for number, step in steps:
        if number in only:
            step_started = time.perf_counter()
            try:
                step()
            except Exception as err:  # noqa: BLE001
                record_error(f"measure {number}", err)
                traceback.print_exc()
            print(f"   ({time.perf_counter() - step_started:.0f} s)", flush=True)
    text = report(args, time.perf_counter() - started)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print("\n" + text)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
