"""A stage's pass over ranges of problems, spread over worker processes of the machine it runs on.

In one process a ranged stage (verify, filter, pairs) reads every input, spills it by range
(`in_key_ranges`), runs its function on each range and writes the output (`Lake.publish`): one core,
however many the machine has. `spread_ranges` does the same work in `workers` processes, in two steps:

1. read and split: each input is read in tasks, in its order: slices of its parts' row groups (a part of
   a million rows is four tasks), or of a held input (a round's stats), written once to an Arrow file. A
   worker reads its task's rows, checked against the manifest as `Lake.reader` reads them
   (`Lake.part_batches`), adds them to the input's fingerprint (a count and a sum of row hashes: the
   tasks' shares add up to what one pass would hash, `RowsFingerprint`), maps them through the input's
   `prepare` if it has one (verify keeps a rollout's boxes, not its text), and splits them by range into
   one Arrow file of its own: each block of rows sorted by range, a batch per range, and an index of which
   batches hold which range (at 10M rollouts a file per range and task was ~24,000 files a stage, and
   removing them ~2.5 s of the stage process's own time).
2. ranges: the ranges, in key order, are cut into contiguous blocks. A worker reads each range of its
   block from every task's file (that range's batches only), in task order (a range's rows then come in the order one process reads
   them), runs the stage's function on it and writes the output tables' parts into the stage folder, named
   to sort by block (`TableWriter(order=block)`): the committed table reads back in range order, as if one
   process had written it.

The workers commit nothing: the stage's process commits every part in one manifest (`WrittenParts` given
to `Lake.publish`), as it does its own; when a worker fails, the others are stopped and the parts they
reported removed. A worker killed mid-write leaves parts no manifest lists, which the next stage start on
the run sweeps (`Lake.sweep`, under the run's lock). The split files live in the stage process's spill
folder: the workers unlink them once every block is done, the stage process removes the folder at the
end whatever happens.

Workers are spawned (the stage process holds DuckDB and Prefect threads, which a fork would copy
mid-state), once per call, and each runs DuckDB on its share of the machine's cores. `LakeWorkers` is
the pool itself, which `evoforge export` also uses to write a table's parts at once (flows/export.py).
"""
from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Union

import pyarrow as pa
import pyarrow.compute as pc

from evoforge.data import lake as lake_module
from evoforge.data import schemas
from evoforge.data.children import die_with_parent
from evoforge.data.lake import (Lake, RowsFingerprint, TableWriter, WrittenParts, lake, new_spill_folder, range_slices,
                                use_lake)
from evoforge.data.manifest import Part
from evoforge.data.storage import remove_tree

# rows of an input per reading task: a part of a million rows is read by four workers (each a slice of its row
# groups), a round's stats at 10M rollouts (1.25M problems) by five
READ_TASK_ROWS = 262_144
# Blocks of ranges: each writes parts of its own, so a block per worker at least (all work at once), and one
# per BLOCK_ROWS input rows above that, up to BLOCKS_PER_WORKER each (a worker done early takes another): a
# 1M-rollout round on 2 workers writes verify's verdicts in 2 parts, not 8 parts that every query lists
BLOCK_ROWS = 1_000_000
BLOCKS_PER_WORKER = 4


@dataclass(frozen=True)
class StreamSource:
    """A committed table of a stage's output, `columns` only, read part by part by the workers;
    `keep_keys`: only the rows whose key is one of these (pairs: the rollouts of this round's kept
    variants, out of all its synthesize stage's rollouts)."""
    run: str
    round: int
    made_by: str
    table: str
    columns: tuple[str, ...]
    keep_keys: tuple[str, ...] | None = None


Source = Union[StreamSource, pa.Table]
# a range's inputs, by name -> (table, rows) pairs: rows of an output table, or of a table handed back to the caller
RangeFunction = Callable[[dict[str, pa.Table]], Iterable[tuple[str, pa.Table]]]
# an input's rows as read -> the rows its ranges are given (a module-level function: it is sent to the workers)
Prepare = Callable[[pa.RecordBatch], pa.RecordBatch]


@dataclass(frozen=True)
class RangedPass:
    """A stage's pass over ranges of `key`, as data: the rows of every source of an input (in order) go to
    `per_range` a range at a time, under the input's name. The tables `per_range` gives that are in
    `outputs` are written into stage `stage`'s folder of `run`/`round`; any other it gives is handed back
    (small ones: pairs' questions of the searched problems). `per_range` is sent to the workers: a
    module-level function, or a `functools.partial` of one. `prepare`: per input, what its rows become as they
    are read, before they are split (the input's fingerprint is of the rows read)."""
    run: str
    round: int
    stage: str
    key: str
    boundaries: tuple[str, ...]
    inputs: dict[str, list[Source]]
    per_range: RangeFunction
    outputs: tuple[str, ...]
    prepare: dict[str, Prepare] = field(default_factory=dict)


@dataclass
class SpreadResult:
    parts: dict[str, WrittenParts]  # per output table, in block order: for `Lake.publish`
    fingerprints: dict[StreamSource, str]  # each stream's content hash, as one pass would give it (`RowsFingerprint`)
    rows: dict[str, int]  # rows taken per input (after `keep_keys`)
    returned: dict[str, pa.Table]  # the tables `per_range` gave that are not outputs, in range order


@dataclass(frozen=True)
class _ReadTask:
    index: int
    input: str
    source: StreamSource | None = None
    part: Part | None = None
    share: tuple[int, int] = (0, 1)  # of the part's row groups: the k-th of n slices
    held_file: str | None = None  # an Arrow file of a held input, and the slice of it to take
    start: int = 0
    length: int = 0

    @property
    def rows(self) -> int:
        """About how many rows it reads (for the progress)."""
        return self.part.rows // self.share[1] if self.part is not None else self.length


def spread_ranges(job: RangedPass, workers: int, on_progress: Callable[[str, int, int], None] | None = None
                  ) -> SpreadResult:
    """Run `job` in `workers` spawned processes. `on_progress(step, done, total)`: rows read and split,
    then ranges done."""
    store = lake()
    progress = on_progress or (lambda step, done, total: None)
    folder = new_spill_folder()
    written: list[Part] = []
    try:
        tasks, schemas_of = _read_tasks(store, job, folder)
        with LakeWorkers(workers, str(store.root)) as pool:
            # 1. read and split: each task's rows into a file of its own, a batch per range of each block read
            sums: dict[StreamSource, tuple[int, int | None]] = {}
            rows: dict[str, int] = {name: 0 for name in job.inputs}
            total_rows = sum(t.rows for t in tasks)
            done = 0
            progress("read", 0, total_rows)
            batches_of: dict[int, dict[int, list[int]]] = {}  # per task: its file's batches of each range
            for task, (hashed, taken, batches_of[task.index]) in pool.each(
                    [(task, pool.submit(_read_and_split, task, str(folder), job.key, job.boundaries,
                                        job.prepare.get(task.input))) for task in tasks]):
                rows[task.input] += taken
                if task.source is not None:
                    sums[task.source] = _added(sums.get(task.source, (0, None)), hashed)
                done += task.rows
                progress("read", done, total_rows)
            fingerprints = {}
            for name, sources in job.inputs.items():
                for source in sources:
                    if isinstance(source, StreamSource):
                        fingerprints[source] = RowsFingerprint.value_of(list(source.columns), *sums.get(source, (0, None)))
            # 2. ranges: contiguous blocks, each written under names that sort by block
            ranges = len(job.boundaries) + 1
            count = min(ranges, workers * BLOCKS_PER_WORKER, max(workers, total_rows // BLOCK_ROWS))
            blocks = [(ranges * b // count, ranges * (b + 1) // count) for b in range(count)]
            progress("ranges", 0, ranges)
            parts: dict[int, dict[str, list[Part]]] = {}
            returned: dict[int, dict[str, pa.Table]] = {}
            done = 0
            futures = [(block, pool.submit(_ranges, job.run, job.round, job.stage, block, first, last, str(folder),
                                           _files_of_block(tasks, batches_of, first, last, job.inputs), schemas_of,
                                           job.per_range, job.outputs))
                       for block, (first, last) in enumerate(blocks)]
            for block, (made, handed_back) in pool.each(futures, on_result=lambda made: written.extend(
                    p for ps in made[0].values() for p in ps)):
                parts[block], returned[block] = made, handed_back
                done += blocks[block][1] - blocks[block][0]
                progress("ranges", done, ranges)
            # the split files are spent: the workers unlink them, a share each (~8 GB at 10M rollouts took ~1.2 s
            # of this process's own time, which no worker shares)
            spent = [str(_split_file(folder, task.index)) for task in tasks if batches_of[task.index]]
            pool.map(_remove_files, [(spent[share::workers],) for share in range(workers)])
        ordered = {table: WrittenParts(tuple(p for block in sorted(parts) for p in parts[block].get(table, ())))
                   for table in job.outputs}
        back: dict[str, list[pa.Table]] = {}
        for block in sorted(returned):
            for name, table in returned[block].items():
                back.setdefault(name, []).append(table)
        return SpreadResult(ordered, fingerprints, rows, {name: pa.concat_tables(t) for name, t in back.items()})
    except BaseException:
        stage_dir = store.stage_dir(job.run, job.round, job.stage)
        for part in written:  # reported by the workers, listed by no manifest: ours to remove
            (stage_dir / part.file).unlink(missing_ok=True)
        raise
    finally:
        remove_tree(folder)


def _added(sums: tuple[int, int | None], more: tuple[int, int | None]) -> tuple[int, int | None]:
    """Two shares of a stream's (row count, sum of row hashes); None: no row hashed yet."""
    (rows, total), (more_rows, more_total) = sums, more
    return rows + more_rows, more_total if total is None else total if more_total is None else total + more_total


def _read_tasks(store: Lake, job: RangedPass, folder: Path) -> tuple[list[_ReadTask], dict[str, pa.Schema]]:
    """Every part of every stream, and slices of every held input, in input order; the schema each input's
    rows have (a held input is cast to its streams'), and have once prepared."""
    tasks: list[_ReadTask] = []
    schemas_of: dict[str, pa.Schema] = {}
    for name, sources in job.inputs.items():
        streamed = [s for s in sources if isinstance(s, StreamSource)]
        schemas_of[name] = (store.read_schema(streamed[0].table, list(streamed[0].columns)) if streamed
                            else sources[0].schema)
        for source in sources:
            if isinstance(source, StreamSource):
                manifest = store.manifest(source.run, source.round, source.made_by)
                for part in manifest.parts if manifest else ():
                    if part.table == source.table:
                        tasks += [_ReadTask(len(tasks) + k, name, source=source, part=part, share=share)
                                  for k, share in enumerate(part_shares(part))]
                continue
            path = folder / f"held-{len(tasks)}.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schemas_of[name]) as writer:
                writer.write_table(source.select(schemas_of[name].names).cast(schemas_of[name]))
            for start in range(0, source.num_rows, READ_TASK_ROWS):
                tasks.append(_ReadTask(len(tasks), name, held_file=str(path), start=start,
                                       length=min(READ_TASK_ROWS, source.num_rows - start)))
    for name, prepare in job.prepare.items():
        schemas_of[name] = prepare(pa.RecordBatch.from_pylist([], schema=schemas_of[name])).schema
    return tasks, schemas_of


def part_shares(part: Part) -> list[tuple[int, int]]:
    """The slices of a part's row groups its readers take, one per READ_TASK_ROWS rows: (k, n), the k-th of n
    (`Lake.part_batches`'s `share`)."""
    slices = max(1, -(-part.rows // READ_TASK_ROWS))
    return [(k, slices) for k in range(slices)]


def _split_file(folder: str, task: int) -> Path:
    return Path(folder) / f"{task:06d}.arrow"


def _files_of_block(tasks: list[_ReadTask], batches_of: dict[int, dict[int, list[int]]], first: int, last: int,
                    inputs: dict) -> dict[str, list[tuple[int, dict[int, list[int]]]]]:
    """Per input, in task order: each task with rows in ranges `first` to `last` (excluded), and its batches of
    each of those ranges (what a block's worker is sent: not the index of every range)."""
    files: dict[str, list[tuple[int, dict[int, list[int]]]]] = {name: [] for name in inputs}
    for task in tasks:
        held = {index: batches for index, batches in batches_of[task.index].items() if first <= index < last}
        if held:
            files[task.input].append((task.index, held))
    return files


# -- in the workers ------------------------------------------------------------------------------
def _frozen_first(function: Callable, *args):
    """`function(*args)`, the objects alive before it (the modules a worker imported, its caches) first left out of
    the cyclic garbage collector's passes: a worker allocating millions of objects ran full collections over
    them (~4% of export's CPU). A cycle among those is never collected: a worker serves one stage or export."""
    gc.freeze()
    return function(*args)


def _start_worker(stage_process: int, lake_root: str, sql_threads: int) -> None:
    die_with_parent(stage_process)  # a stage process killed outright takes its workers with it: none writes on, unwatched
    use_lake(lake_root)
    lake_module.SQL_THREADS = sql_threads  # the machine's cores, shared by the workers' DuckDBs


def _read_and_split(task: _ReadTask, folder: str, key: str, boundaries: tuple[str, ...], prepare: Prepare | None
                    ) -> tuple[tuple[int, int | None], int, dict[int, list[int]]]:
    """Step 1 for one task: (the rows' count and hash sum, for the input's fingerprint), rows taken, and which
    batches of its file hold each range (`_split_file`: written only when a row was taken), of its rows
    through `prepare`."""
    source = task.source
    hashed = None
    if source is not None:
        batches = lake().part_batches(source.run, source.round, source.made_by, task.part, list(source.columns),
                                      task.share)
        hashed = RowsFingerprint(lake().read_schema(source.table, list(source.columns)))
    else:
        batches = pa.ipc.open_file(pa.memory_map(task.held_file)).read_all().slice(task.start, task.length).to_batches()
    keep = pa.array(source.keep_keys, pa.string()) if source is not None and source.keep_keys is not None else None
    taken = [0]

    def rows():
        for batch in batches:
            if hashed is not None:
                hashed.add(batch)
            if keep is not None:
                batch = batch.filter(pc.is_in(batch[key], value_set=keep))
            taken[0] += batch.num_rows
            yield batch if prepare is None else prepare(batch)

    of_range: dict[int, list[int]] = {}
    writer, written = None, 0
    try:
        for index, piece in range_slices(rows(), key, list(boundaries)):
            if writer is None:
                writer = pa.ipc.new_file(str(_split_file(folder, task.index)), piece.schema)
            writer.write_batch(piece)
            of_range.setdefault(index, []).append(written)
            written += 1
    finally:
        if writer is not None:
            writer.close()
    return (hashed.sums() if hashed is not None else (0, None)), taken[0], of_range


def _ranges(run: str, round: int, stage: str, block: int, first: int, last: int, folder: str,
            files: dict[str, list[tuple[int, dict[int, list[int]]]]], schemas_of: dict[str, pa.Schema],
            per_range: RangeFunction, outputs: tuple[str, ...]) -> tuple[dict[str, list[Part]], dict[str, pa.Table]]:
    """Step 2 for one block of ranges (`files`: per input, the tasks with rows in them and their batches of
    each range): the parts it wrote per output table, the tables it hands back."""
    stage_dir = lake().stage_dir(run, round, stage)
    writers: dict[str, TableWriter] = {}
    handed_back: dict[str, list[pa.Table]] = {}
    opened: dict[int, tuple[pa.OSFile, pa.ipc.RecordBatchFileReader]] = {}  # read, not mapped: a range's rows are freed
    try:
        for index in range(first, last):
            ranged = {}
            for name, tasks in files.items():
                tables = []
                for task, batches_of in tasks:
                    if index in batches_of:
                        if task not in opened:
                            file = pa.OSFile(str(_split_file(folder, task)))
                            opened[task] = (file, pa.ipc.open_file(file))
                        reader = opened[task][1]
                        tables.append(pa.Table.from_batches([reader.get_batch(i) for i in batches_of[index]]))
                ranged[name] = pa.concat_tables(tables) if tables else schemas_of[name].empty_table()
            for table, rows in per_range(ranged):
                rows = pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows
                if table not in outputs:
                    handed_back.setdefault(table, []).append(rows)
                    continue
                if table not in writers:
                    writers[table] = TableWriter(stage_dir, table, schemas.ROUND_TABLES[table], None, order=block)
                writers[table].write(schemas.conform(rows, writers[table].schema, where=f"{stage}/{table}"))
        parts = {table: writer.close(empty_part=False) for table, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        for file, _ in opened.values():
            file.close()
    return parts, {name: pa.concat_tables(tables) for name, tables in handed_back.items()}


def _remove_files(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


# -- the processes ---------------------------------------------------------------------------------
class LakeWorkers:
    """`workers` spawned processes pointed at the lake under `lake_root`, each dying with this one. Leaving the
    block stops them; on an error they are killed, not waited for (a block of ranges can take minutes)."""

    def __init__(self, workers: int, lake_root: str):
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(os.getpid(), lake_root, threads))

    def __enter__(self) -> "LakeWorkers":
        return self

    def map(self, function: Callable, calls: list[tuple]) -> list:
        """`function(*args)` for each of `calls`, in the workers; the results in order (the first error raised)."""
        futures = [(index, self.submit(function, *args)) for index, args in enumerate(calls)]
        results = dict(self.each(futures))
        return [results[index] for index in range(len(calls))]

    def submit(self, function, *args) -> Future:
        return self._pool.submit(_frozen_first, function, *args)

    def each(self, futures: list[tuple[object, Future]], on_result: Callable[[object], None] | None = None):
        """(label, result) as each future finishes; the first error is raised once every result that
        came is reported (`on_result`: what the caller must clean up if a later one fails)."""
        pending = {future: label for label, future in futures}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            failed = None
            for future in finished:
                label = pending.pop(future)
                if future.exception() is not None:
                    failed = failed or future.exception()
                    continue
                if on_result is not None:
                    on_result(future.result())
                yield label, future.result()
            if failed is not None:
                for future in list(pending):  # results still to come: reported before the error is raised
                    if future.done() and future.exception() is None and on_result is not None:
                        on_result(future.result())
                raise failed

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self._pool.shutdown(wait=True)
            return
        # the public API cannot stop a task that is running: kill the processes, then shut down
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=True, cancel_futures=True)
