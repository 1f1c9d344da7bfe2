"""The one input layer: what a stage flow reads, each defined once. Stage flows read through these
functions and never import each other.

- round tables: `round_table` (a stage's output in a round, required) and `stage_output` (may be empty),
  whole; `round_stream` / `stage_stream` for the large ones (rollouts, verdicts), read part by part
- a stage's input fingerprint over streamed tables: `StageInputs` (from the parts' checksums, or hashed
  in the stage's own pass: each input read once)
- the problem pool of a round (held, or streamed: `pool_streams`), and its problems with an expert answer (RARO)
- the checkpoint a round trained, for a role (`policy`, `ppm`), and the promotion decision on it
- the policy of a round: the last promoted model before it
- the run config: given, named by file, or the run's saved one; and a round's policy applied to it
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from evoforge.data.ids import stable_hash
from evoforge.data.lake import RowsFingerprint, fingerprint_rows, lake
from evoforge.flows.config import ConfigError, RoundConfig, load_config, resolve_path, save_config


# the stage_runs statuses of an execution whose output is in place
FINISHED = ("completed", "skipped")


class MissingInput(RuntimeError):
    """A stage's input is not in the lake yet (the stage that writes it has not run)."""


# -- tables ------------------------------------------------------------------------------------
def stage_output(run: str, round: int, table: str, made_by: str) -> pa.Table:
    """`table` as stage `made_by` wrote it in `round`, without the `round` and `stage` columns; empty
    when that stage wrote none (an optional input: kept variants, MCTS nodes)."""
    return lake().read(run, table, round, made_by).drop_columns(["round", "stage"])


def stage_finished(run: str, round: int, stage: str) -> bool:
    """Whether `stage` of `round` has completed (or was skipped as unchanged) at least once."""
    events = lake().read(run, "stage_runs")
    return any(e["round"] == round and e["stage"] == stage and e["status"] in FINISHED
               for e in events.select(["round", "stage", "status"]).to_pylist())


def round_table(run: str, round: int, table: str, made_by: str, columns: list[str] | None = None) -> pa.Table:
    """`table` as stage `made_by` wrote it in `round` (later stages may add their own rows), `columns` only
    when given (a round's stats read whole decode every problem's pass@k map: 1 s of pairs' own time at 10M
    rollouts, for the two columns it uses); a required input: empty only when that stage ran and found
    nothing to write (no correct answer, no SFT example), else MissingInput names the command that makes it."""
    rows = lake().read(run, table, round, made_by, columns=columns)
    if rows.num_rows == 0:
        _require(run, round, table, made_by)
    return rows


@dataclass(frozen=True)
class TableStream:
    """A round table too large to hold, with the columns a stage reads: its row count comes from its
    stage's manifest; `reader()` streams its rows, part by part and checked, each call anew."""
    run: str
    round: int
    table: str
    made_by: str
    columns: tuple[str, ...]
    rows: int

    def reader(self) -> pa.RecordBatchReader:
        return lake().reader(self.run, self.table, self.round, self.made_by, columns=list(self.columns))

    def fingerprint(self) -> str:
        """Content hash of the columns read (one streamed pass): a stage whose input was rewritten
        with the same content (a damaged output recomputed) is still skipped as unchanged."""
        return fingerprint_rows(self.reader())

    def parts(self) -> str:
        """What the stream reads, without reading it: the columns and the checksums of the parts its
        stage's manifest lists (`StageInputs`)."""
        manifest = lake().manifest(self.run, self.round, self.made_by)
        return stable_hash("parts", self.table, *self.columns,
                           *(p.sha256 for p in (manifest.parts if manifest else ()) if p.table == self.table))


def stage_stream(run: str, round: int, table: str, made_by: str, columns: list[str]) -> TableStream:
    """`stage_output`, streamed: empty when that stage wrote none."""
    return TableStream(run, round, table, made_by, tuple(columns), lake().table_rows(run, round, made_by).get(table, 0))


def round_stream(run: str, round: int, table: str, made_by: str, columns: list[str]) -> TableStream:
    """`round_table`, streamed: MissingInput when the stage that writes it has not run."""
    stream = stage_stream(run, round, table, made_by, columns)
    if stream.rows == 0:
        _require(run, round, table, made_by)
    return stream


class StageInputs:
    """A stage's inputs, held tables and streams, fingerprinted without a pass of their own: what a
    stage that streams a large input gives `execute_stage` as its input fingerprint.

    - `parts()`: what they are made of, known without reading them: each held table by its content,
      each stream by the checksums of the parts its manifest lists (and the columns read). A rerun
      on the same parts is found unchanged by it alone.
    - `reader(stream)`: the stream as the stage reads it, its rows hashed as they go by, so the first
      complete pass also gives the stream's content fingerprint.
    - `fingerprint()`: one hash of the inputs' content, each held table's `fingerprint_rows` and each
      stream's `TableStream.fingerprint` (an input rewritten with the same rows, e.g. a damaged part
      recomputed, still counts as unchanged): a stream the stage has read whole is not read again;
      only one it has not (to compare with an execution on other parts) is.
    Each input is then read once per execution: by the stage, or to skip it."""

    def __init__(self, *inputs: pa.Table | TableStream):
        self.inputs = inputs
        self._streams = [i for i in inputs if isinstance(i, TableStream)]
        self._hashed: dict[int, str] = {}  # index in _streams -> content fingerprint of a complete pass
        self._hashing: set[int] = set()
        # a held table by its rows' hashes, not `fingerprint_table`'s sorted copy: a 10M-rollout round's golds
        # (1.25M rows) took 1.4 s that way in the stage's own process before any worker starts, 0.2 s this way
        self._tables = [None if isinstance(i, TableStream) else fingerprint_rows(i) for i in inputs]

    def parts(self) -> str:
        return stable_hash("input-parts", *(i.parts() if isinstance(i, TableStream) else held
                                            for i, held in zip(self.inputs, self._tables)))

    def _index(self, stream: TableStream) -> int:
        return next(n for n, s in enumerate(self._streams) if s is stream)

    def reader(self, stream: TableStream) -> pa.RecordBatchReader:
        index = self._index(stream)
        source = stream.reader()
        if index in self._hashed or index in self._hashing:
            return source
        self._hashing.add(index)
        rows = RowsFingerprint(source.schema)

        def hashed():
            for batch in source:
                rows.add(batch)
                yield batch
            self._hashed[index] = rows.value()

        return pa.RecordBatchReader.from_batches(source.schema, hashed())

    def hashed(self, stream: TableStream, fingerprint: str) -> None:
        """`stream`'s content fingerprint, taken by the processes that read it for the stage (flows/spread.py)."""
        self._hashed[self._index(stream)] = fingerprint

    def fingerprint(self) -> str:
        values = []
        for i, held in zip(self.inputs, self._tables):
            if isinstance(i, TableStream):
                index = self._index(i)
                if index not in self._hashed:
                    self._hashed[index] = i.fingerprint()  # a pass of its own: the stage did not read it whole
                values.append(self._hashed[index])
            else:
                values.append(held)
        return stable_hash("inputs", *values)


def _require(run: str, round: int, table: str, made_by: str) -> None:
    if not (lake().has_output(run, round, made_by) and stage_finished(run, round, made_by)):
        raise MissingInput(
            f"run {run!r} round {round} has no {table}: run `evoforge stage {made_by} --run {run} --round {round}` first"
        )


def problem_pool(run: str, round: int, columns: list[str] | None = None) -> pa.Table:
    """P_r: the ingested problems plus the SvS variants kept in rounds before r (`columns` only, with
    `round` and `stage`, when given: a stage that needs the golds does not hold the questions)."""
    columns = None if columns is None else list(dict.fromkeys([*columns, "round", "stage"]))
    problems = lake().read(run, "problems", columns=columns)
    seeds = pc.equal(problems["stage"], "ingest")
    earlier_variants = pc.and_(pc.equal(problems["stage"], "synthesize"), pc.less(problems["round"], round))
    problems = problems.filter(pc.or_(seeds, earlier_variants))
    if problems.num_rows == 0:
        raise MissingInput(f"run {run!r} has no problems for round {round}: ingest a source first (evoforge ingest PATH --run {run})")
    return problems


def pool_streams(run: str, round: int, columns: list[str]) -> list[TableStream]:
    """`problem_pool`, streamed: one stream per stage output that holds the pool's problems (every ingest,
    the synthesize stages of rounds before `round`), `columns` only. What a stage reads when the pool's
    questions would be most of its memory (pairs, at a million problems)."""
    streams = [stage_stream(run, r, "problems", stage, columns) for r, stage, _ in lake().stage_dirs(run)
               if stage == "ingest" or (stage == "synthesize" and r < round)]
    streams = [s for s in streams if s.rows]
    if not streams:
        raise MissingInput(f"run {run!r} has no problems for round {round}: ingest a source first (evoforge ingest PATH --run {run})")
    return streams


def problems_with_experts(run: str, round: int) -> pa.Table:
    """The pool's problems that have an expert answer (the RARO critic compares against it)."""
    problems = problem_pool(run, round).select(["problem_id", "question", "expert_answer"])
    problems = problems.filter(pc.invert(pc.is_null(problems["expert_answer"])))
    if problems.num_rows == 0:
        raise MissingInput(f"run {run!r} has no problems with an expert answer for the critic: ingest demonstrations "
                           f"(evoforge ingest PATH --run {run} --preset demonstrations) or a GSM8K/MATH source")
    return problems


def checkpoint(run: str, round: int, role: str) -> dict | None:
    """The `checkpoints` row that round `round`'s finetune registered for `role` ('policy', 'ppm'), if any."""
    if round < 0:
        return None
    rows = [r for r in lake().read(run, "checkpoints", round, "finetune").to_pylist() if r["role"] == role]
    return rows[0] if rows else None


# -- config ------------------------------------------------------------------------------------
def saved_config_path(run: str) -> Path:
    """Where a run keeps the config it was started with."""
    return lake().run_dir(run) / "config.yaml"


def saved_config(run: str) -> RoundConfig:
    path = saved_config_path(run)
    if not path.exists():
        raise ConfigError(f"run {run!r} has no saved config: start it with a config (--config FILE)")
    return load_config(path)


def run_config(run: str, config: RoundConfig | None = None, config_file: str | None = None) -> RoundConfig:
    """The config given, else the file named, else the run's saved one. A given one is saved into the
    run, so later single-stage reruns use it."""
    if config is None and config_file:
        config = load_config(resolve_path(config_file))
    if config is None:
        return saved_config(run)
    save_config(config, lake().ensure_run(run) / "config.yaml")
    return config


def promotion(run: str, round: int, trained: dict) -> dict | None:
    """The decision on round `round`'s policy checkpoint `trained`: a manual one (`evoforge promote`,
    stage `promote`) wins over the gate's (stage `evaluate`); None when neither has decided. A decision
    on other weights (finetune rerun since, even under the same checkpoint id) does not count."""
    rows = [r for r in lake().read(run, "promotions", round).to_pylist()
            if r["checkpoint_id"] == trained["checkpoint_id"] and r["model_id"] == trained["model_id"]]
    for stage in ("promote", "evaluate"):
        decided = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["decided_at"])
        if decided:
            return decided[-1]
    return None


def gated(config: RoundConfig) -> bool:
    """Whether a checkpoint waits for evaluate's decision before it may become a policy."""
    gate = config.evaluate.gate
    return ("evaluate" in config.stages and bool(config.evaluate.sets)
            and (gate.require != "always" or gate.max_entropy_drop is not None))


@dataclass(frozen=True)
class Policy:
    """The model a round samples from and trains: the last promoted one before it."""
    model_round: int  # 0: the config's model; r + 1: the checkpoint trained in round r
    checkpoint: dict | None  # its `checkpoints` row; None for the config's model
    passed_over: tuple[str, ...] = ()  # the checkpoints since then that were rejected (and why)


def round_policy(run: str, config: RoundConfig, round: int) -> Policy:
    """Walk the rounds before `round` in order: each checkpoint that was promoted becomes the policy.
    A round that trained nothing carries the policy over; a rejected checkpoint is passed over. A
    checkpoint still waiting for its decision, or one trained from a model that is no longer its
    round's policy (a decision changed since), stops with the command that settles it."""
    policy = Policy(0, None)
    trained_before: set[str] = set()  # the run's checkpoints so far: a round on the config's model trains from none
    for earlier in range(round):
        trained = checkpoint(run, earlier, "policy")
        if trained is None:
            continue
        parent = trained["parent_model_id"]
        in_force = policy.checkpoint["model_id"] if policy.checkpoint else None
        if (parent != in_force) if in_force else (parent in trained_before):
            raise MissingInput(
                f"run {run!r}: round {earlier}'s checkpoint {trained['checkpoint_id']} was trained from {parent}, but "
                f"round {earlier}'s policy is now {in_force or 'the config model'} (a promotion decision changed "
                f"since): run the round again, `evoforge round --run {run} --round {earlier}`")
        trained_before.add(trained["model_id"])
        decided = promotion(run, earlier, trained)
        if decided is None and gated(config):
            raise MissingInput(
                f"run {run!r}: round {earlier}'s checkpoint {trained['checkpoint_id']} has no promotion decision yet: run "
                f"`evoforge stage evaluate --run {run} --round {earlier}` (the gate), or decide by hand with "
                f"`evoforge promote --run {run} --round {earlier}` [--reject]")
        if decided is None or decided["decision"] == "promoted":
            policy = Policy(earlier + 1, trained)
        else:
            policy = Policy(policy.model_round, policy.checkpoint,
                            (*policy.passed_over, f"{trained['checkpoint_id']} ({decided['why']})"))
    return policy


def with_policy(config: RoundConfig, policy: Policy) -> RoundConfig:
    """`config` with its engine on `policy` (the config's own model when no checkpoint is promoted)."""
    if policy.checkpoint is None:
        return config
    return config.model_copy(update={"engine": config.engine.model_copy(update={"model": policy.checkpoint["path"]})})


def policy_for_round(run: str, config: RoundConfig, round: int) -> RoundConfig:
    """Round r's config: the engine loads the last promoted policy checkpoint before round r, if any."""
    return with_policy(config, round_policy(run, config, round))


def stage_config(run: str, round: int, config: RoundConfig | None) -> RoundConfig:
    """What a stage of `round` runs with: the run config (the one given, else the run's saved one)
    with the round's policy."""
    return policy_for_round(run, config if config is not None else saved_config(run), round)


def next_round(run: str, config: RoundConfig) -> int:
    """The first round whose last configured stage has not finished: a scheduled round continues an
    interrupted one, or starts the one after the last finished."""
    events = lake().read(run, "stage_runs").to_pylist()
    last = config.stages[-1] if config.stages else "ingest"
    done = [e["round"] for e in events if e["stage"] == last and e["status"] in FINISHED]
    return max(done) + 1 if done else 0
