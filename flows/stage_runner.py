"""What every stage flow does around its task: the run lock, fingerprints, skip-if-unchanged,
`stage_runs` (including attempts a crash cut short), resumable chunks, atomic publication of the
outputs, the catalog refresh and the stage's Prefect artifacts.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa

from evoforge.data import catalog
from evoforge.data.chunks import Chunks, chunk_root
from evoforge.data.ids import stable_hash
from evoforge.data.lake import DamagedPart, Lake, TableSource, lake
from evoforge.data.runlock import run_lock
from evoforge.data.storage import remove_tree
from evoforge.flows.artifacts import publish_stage_artifacts, summary_tables
from evoforge.flows.inputs import FINISHED, StageInputs
from evoforge.flows.stages import STAGES
from evoforge.tasks.progress import flow_run_logger

TERMINAL = ("completed", "skipped", "failed", "interrupted")


@dataclass
class StageResult:
    stage: str
    round: int
    status: str  # completed | skipped
    rows_in: int
    rows_out: int
    rows_quarantined: int
    output_fingerprint: str | None
    # the outputs the stage returned whole (small ones, e.g. ingest's quarantine); a streamed output is
    # written as it is produced and never held: read it from the lake. Empty when skipped.
    tables: dict[str, pa.Table] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # rows written per output table; empty when skipped


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def _event(base: dict, **changes) -> pa.Table:
    return pa.Table.from_pylist([{**base, **changes}])


def mark_interrupted(store: Lake, run: str) -> list[dict]:
    """Close the `running` events that never got an end: their process died (we hold the lock, so
    nobody else is running). Returns the attempts it closed."""
    events = store.read(run, "stage_runs").to_pylist()
    ended = {e["stage_run_id"] for e in events if e["status"] in TERMINAL}
    open_attempts = [e for e in events if e["status"] == "running" and e["stage_run_id"] not in ended]
    for attempt in open_attempts:
        store.append_run_table(run, "stage_runs", _event(
            attempt, status="interrupted", finished_at=_now(),
            error="the process ended before the stage finished (killed or crashed); a rerun resumes from its completed chunks",
        ))
    return open_attempts


@contextmanager
def run_guard(run: str, what: str):
    """The run's lock, plus cleaning up after writers that died: their temporary files are swept (no
    writer of this run is alive but us while we hold the lock) and the attempts they left open are
    closed. A round holds it around its stages."""
    store = lake()
    with run_lock(store.run_dir(run), what):
        swept = store.sweep(run)
        if swept:
            flow_run_logger().warning(f"run {run}: removed {swept} temporary file(s) that writers which died left behind")
        store.ensure_run(run)
        merged = store.compact_run_table(run, "stage_runs")  # we are its only writer while we hold the lock
        if merged:
            flow_run_logger().info(f"run {run}: merged {merged} stage_runs files into one")
        for attempt in mark_interrupted(store, run):
            flow_run_logger().warning(f"{attempt['stage']} (run {run}, round {attempt['round']}): an earlier attempt "
                                 f"started {attempt['started_at']:%Y-%m-%d %H:%M:%S} was interrupted")
        yield store


def execute_stage(
    run: str,
    round: int,
    stage: str,
    *,
    config_hash: str,
    model_id: str | None,
    input_fingerprint: str | StageInputs,
    rows_in: int | None | Callable[[], int],
    compute: Callable[[Chunks], dict[str, TableSource]],
    force: bool = False,
    part: str | None = None,
) -> StageResult:
    """Run `compute` unless an identical earlier execution's output is still in place.

    `compute(chunks)` gets the chunk store of this execution: batches it stores there survive a
    crash, and the same command resumes from them (see data/chunks.py). It returns each output
    table whole or as an iterable of its rows (record batches or tables), which is written in
    bounded parts as it is produced (Lake.publish) and never held. `part`: the stage commits
    one input at a time (ingest: one source) and replaces that input's parts instead of its whole
    output. A damaged output is never skipped as unchanged. `rows_in=None`: every input row ends in
    an output or in quarantine (ingest), so rows in = rows out + rows quarantined; a callable: counted
    by `compute`'s own pass, asked once it is done. Holds the run's lock throughout: a second process
    working on the same run is refused with RunBusy.

    `input_fingerprint`: the inputs' content hash, or their `StageInputs` (flows/inputs.py), which
    read nothing to decide: an earlier execution on the same parts (`input_parts`) is unchanged; one
    on other parts reads the inputs once to compare their content; a computed execution hashes them
    in its own pass. The chunks of an execution are keyed by its inputs' parts.
    """
    with run_guard(run, f"round {round} / {stage}") as store:
        result = _execute_locked(store, run, round, stage, config_hash, model_id, input_fingerprint, rows_in,
                                 compute, force, part)
    try:
        tables, rows = summary_tables(store, run, round, stage, result.tables)
        rows.update(result.rows)  # what this execution wrote (one input's, for a stage committed by input)
    except Exception as err:  # the UI is a view of the lake: never fail a stage over it
        flow_run_logger().warning(f"{stage}: could not read its output for the summary ({type(err).__name__}: {err})")
        tables, rows = dict(result.tables), None
    publish_stage_artifacts(run, round, stage, result.status,
                            {"rows in": result.rows_in, "rows out": result.rows_out,
                             "rows quarantined": result.rows_quarantined}, tables, rows)
    return result


def _execute_locked(store: Lake, run, round, stage, config_hash, model_id, input_fingerprint, rows_in,
                    compute, force, part) -> StageResult:
    log = flow_run_logger()
    inputs = input_fingerprint if isinstance(input_fingerprint, StageInputs) else None
    fingerprint = None if inputs is not None else input_fingerprint  # by content; for StageInputs, once known
    input_parts = inputs.parts() if inputs is not None else None
    previous = [
        r
        for r in store.read(run, "stage_runs").to_pylist()
        if r["round"] == round and r["stage"] == stage and r["status"] in FINISHED
        and r["config_hash"] == config_hash and r["model_id"] == model_id
    ]
    try:
        output_fp = store.output_fingerprint(run, round, stage, key=part)
        damaged = store.output_damage(run, round, stage, key=part) if output_fp is not None else []
    except DamagedPart as err:  # an unreadable manifest: the whole output is recomputed and replaced
        if part is not None:
            raise
        output_fp, damaged = None, [err.damage]
    for damage in damaged:
        log.warning(f"{stage} (run {run}, round {round}): {damage.path} is damaged ({damage.reason}); recomputing")
    unchanged = []  # earlier executions on these inputs whose output is still in place
    if not force and output_fp is not None and not damaged:
        same_output = [r for r in previous if r["output_fingerprint"] == output_fp]
        if inputs is not None and same_output:
            unchanged = [r for r in same_output if r.get("input_parts") == input_parts]
            if unchanged:
                fingerprint = unchanged[0]["input_fingerprint"]  # the same parts: the same content
            else:
                fingerprint = inputs.fingerprint()  # other parts: one pass to compare their content
        unchanged = unchanged or [r for r in same_output if r["input_fingerprint"] == fingerprint]
    base = dict(
        stage_run_id=uuid.uuid4().hex, run=run, round=round, stage=stage, flow_run_id=_flow_run_id(),
        config_hash=config_hash, model_id=model_id, input_fingerprint=fingerprint, input_parts=input_parts,
        output_fingerprint=None, rows_in=None if callable(rows_in) else rows_in, rows_out=None, rows_quarantined=None,
        started_at=_now(), finished_at=None, status="running", error=None,
    )
    if unchanged:
        done = max(unchanged, key=lambda r: r["finished_at"])
        store.append_run_table(
            run, "stage_runs",
            _event(base, status="skipped", output_fingerprint=output_fp, rows_in=done["rows_in"], rows_out=done["rows_out"],
                   rows_quarantined=done["rows_quarantined"], finished_at=_now()),
        )
        log.info(
            f"{stage} (run {run}, round {round}): inputs, config and model unchanged since "
            f"{done['finished_at']:%Y-%m-%d %H:%M:%S}; nothing to do (use --force to recompute)"
        )
        return StageResult(stage, round, "skipped", done["rows_in"] or 0, done["rows_out"] or 0,
                           done["rows_quarantined"] or 0, output_fp)

    root = chunk_root(store.run_dir(run), round, stage)
    chunks = Chunks(root / stable_hash(config_hash, model_id, fingerprint if inputs is None else input_parts, part))
    if force:
        chunks.clear()  # --force means recompute, not resume
    elif chunks.folder.exists():
        log.info(f"{stage} (run {run}, round {round}): resuming from the chunks an interrupted attempt completed")
    store.append_run_table(run, "stage_runs", _event(base))
    try:
        tables = compute(chunks)
        unexpected = sorted(set(tables) - set(STAGES[stage].writes))
        if unexpected:  # the registry says what a stage writes; catalog views and readers rely on it
            raise RuntimeError(f"{stage} returned tables {unexpected} that the stage registry does not list")
        published = store.publish(run, round, stage, tables, key=part, config_hash=config_hash)
        output_fp = published.fingerprint
        if inputs is not None:
            fingerprint = inputs.fingerprint()  # hashed as `compute` read them: nothing is read again
    except BaseException as err:
        message = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        # Ctrl-C or kill (SIGTERM): stopped, not broken; a rerun resumes from the completed chunks
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        store.append_run_table(run, "stage_runs", _event(base, status=status, error=message, finished_at=_now()))
        raise
    reused, computed = chunks.counts()
    if reused:
        log.info(f"{stage} (run {run}, round {round}): {reused} chunk(s) reused from an interrupted attempt, "
                 f"{computed} computed")
    if part is None:
        remove_tree(root)  # published: the chunks (and stale ones of older configs) are spent
    else:
        chunks.clear()
    rows = {name: published.rows(name) for name in tables}  # counted from the parts written, not held
    rows_quarantined = rows.get("quarantine", 0)
    rows_out = sum(n for name, n in rows.items() if name != "quarantine")
    rows_in = rows_out + rows_quarantined if rows_in is None else rows_in() if callable(rows_in) else rows_in
    store.append_run_table(
        run, "stage_runs",
        _event(base, status="completed", input_fingerprint=fingerprint, output_fingerprint=output_fp, rows_in=rows_in,
               rows_out=rows_out, rows_quarantined=rows_quarantined, finished_at=_now()),
    )
    catalog.refresh_catalog(store.run_dir(run))
    log.info(f"{stage} (run {run}, round {round}): {rows_in} in, {rows_out} out, {rows_quarantined} quarantined")
    held = {name: t for name, t in tables.items() if isinstance(t, pa.Table)}
    return StageResult(stage, round, "completed", rows_in, rows_out, rows_quarantined, output_fp, held, rows)
