"""A stage flow's pass over ranges of problems in `cluster.range_workers` processes (data/spread.py): its
streams given as the workers read them, their fingerprints handed to the stage's `StageInputs` (each
input still read once), progress shown as the stage's own."""
from __future__ import annotations

import os

import pyarrow as pa

from evoforge.data.spread import (READ_TASK_ROWS, Prepare, RangedPass, RangeFunction, SpreadResult, StreamSource,
                                  spread_ranges)
from evoforge.flows.config import ClusterConfig
from evoforge.flows.inputs import StageInputs, TableStream
from evoforge.tasks.progress import Progress


# a stage reading fewer rows stays in its own process unless told otherwise: starting workers and splitting its
# input through files costs ~1-2 s, what one process spends on a few hundred thousand rows
AUTO_SPREAD_ROWS = 1_000_000


def range_workers(cluster: ClusterConfig, rows: int) -> int:
    """How many processes a ranged stage reading `rows` rows runs in (`cluster.range_workers`); by default one
    per core, and one per reading task at most (each worker writes parts of its own: a 1M-row stage on a
    64-core machine takes 4, not 64 that would write 64 small parts of every output)."""
    if cluster.range_workers:
        return cluster.range_workers
    if rows < AUTO_SPREAD_ROWS:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), rows // READ_TASK_ROWS))


def stream_source(stream: TableStream, keep_keys: pa.Array | None = None) -> StreamSource:
    return StreamSource(stream.run, stream.round, stream.made_by, stream.table, stream.columns,
                        None if keep_keys is None else tuple(keep_keys.to_pylist()))


def spread_stage(run: str, round: int, stage: str, inputs: StageInputs, named: dict[str, list[TableStream | pa.Table]],
                 boundaries: list[str], per_range: RangeFunction, outputs: tuple[str, ...], workers: int,
                 keep_keys: dict[int, pa.Array] | None = None, prepare: dict[str, Prepare] | None = None) -> SpreadResult:
    """`named` inputs (streams of `inputs`, or held tables) over ranges of problem ids split at `boundaries`;
    `keep_keys`: for a stream (by `id`), only the rows of these problems; `prepare`: per input, what its rows
    become as they are read (`RangedPass.prepare`)."""
    keep_keys = keep_keys or {}
    sources = {name: [stream_source(s, keep_keys.get(id(s))) if isinstance(s, TableStream) else s for s in items]
               for name, items in named.items()}
    bars: dict[str, Progress] = {}

    def on_progress(step: str, done: int, total: int) -> None:
        if step not in bars:
            for bar in bars.values():
                bar.close()
            bars[step] = Progress(f"{stage}: {'read' if step == 'read' else 'ranges'} ({workers} workers)", total,
                                  "rows" if step == "read" else "ranges")
        bars[step].update(done)

    try:
        result = spread_ranges(RangedPass(run, round, stage, "problem_id", tuple(boundaries), sources, per_range, outputs,
                                          prepare or {}), workers, on_progress)
    finally:
        for bar in bars.values():
            bar.close()
    for items, streamed in zip(named.values(), sources.values()):
        for stream, source in zip(items, streamed):
            if isinstance(stream, TableStream):
                inputs.hashed(stream, result.fingerprints[source])
    return result
