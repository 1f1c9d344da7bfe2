"""pairs flow: the round's graded rollouts -> DPO `pairs` and `sft_examples` (kept SvS variants
included); when the round ran the mcts stage, its trees add step pairs (kind 'step') for the PPM.
The pool's problems, rollouts and verdicts stream from the lake in one pass that makes both tables
(DuckDB ranks each problem's rollouts, a range of problems at a time), hashed as they are read for the
stage's input fingerprint (`StageInputs`); the round's stats (an id and a bucket per problem), its kept
variants and its search trees are held."""
from __future__ import annotations

import itertools
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.data.lake import Interleaved, WrittenParts, lake
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import (StageInputs, pool_streams, round_stream, round_table, stage_config, stage_output,
                                   stage_stream)
from evoforge.flows.spread import range_workers, spread_stage
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.pairs import build_step_pairs, made_of_range, pairs_and_sft, pairs_boundaries, questions_of

PROBLEM_COLUMNS = ["problem_id", "question", "origin"]
ROLLOUT_COLUMNS = ["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]


@flow(name="pairs", flow_run_name="{run}/round-{round}/pairs")
def pairs_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    pool = pool_streams(run, round, PROBLEM_COLUMNS)
    stats = round_table(run, round, "problem_stats", "filter", ["problem_id", "bucket"])
    rollouts = round_stream(run, round, "rollouts", "generate", ROLLOUT_COLUMNS)
    verdicts = round_stream(run, round, "verdicts", "verify", ["rollout_id", "problem_id", "verdict"])
    # kept variants of this round: their correct solutions are SFT data too
    variants = stage_output(run, round, "problems", "synthesize").select(PROBLEM_COLUMNS)
    variant_rollouts = stage_stream(run, round, "rollouts", "synthesize", ROLLOUT_COLUMNS)
    variant_verdicts = stage_stream(run, round, "verdicts", "synthesize", ["rollout_id", "problem_id", "verdict"])
    kept = pa.array(sorted(set(variants["problem_id"].to_pylist())), pa.string())
    variant_ids = frozenset(kept.to_pylist())
    nodes = stage_output(run, round, "mcts_nodes", "mcts")
    inputs = StageInputs(*pool, variants, stats, rollouts, verdicts, variant_rollouts, variant_verdicts, nodes)
    kept_variant_rows = [0]  # rollouts of kept variants, counted as the pass goes by
    searched_questions: dict[str, str] = {}  # of the problems the search trees are of, taken as the pool goes by

    def all_problems() -> pa.RecordBatchReader:
        schema = lake().read_schema("problems", PROBLEM_COLUMNS)

        def batches():
            for stream in pool:
                for batch in inputs.reader(stream):
                    if nodes.num_rows:
                        searched_questions.update(questions_of(batch, nodes))
                    yield batch
            yield from variants.cast(schema).to_batches()

        return pa.RecordBatchReader.from_batches(schema, batches())

    def kept_rollouts(reader: pa.RecordBatchReader):
        for batch in reader:
            batch = batch.filter(pc.is_in(batch["problem_id"], kept))
            kept_variant_rows[0] += batch.num_rows
            yield batch

    def all_rollouts() -> pa.RecordBatchReader:
        own = inputs.reader(rollouts)
        extra = kept_rollouts(inputs.reader(variant_rollouts)) if variants.num_rows else ()
        return pa.RecordBatchReader.from_batches(own.schema, itertools.chain(own, extra))

    def all_verdicts() -> pa.RecordBatchReader:
        own = inputs.reader(verdicts)
        extra = inputs.reader(variant_verdicts) if variants.num_rows else ()
        return pa.RecordBatchReader.from_batches(own.schema, itertools.chain(own, extra))

    def step_pairs():
        # after the pass: the pool has gone by, so the searched problems' questions are in
        yield "pairs", build_step_pairs(nodes, searched_questions, config.pairs)

    # at most this many rows: it sets how many ranges of problems the pass takes, not what it finds
    total = rollouts.rows + (variant_rollouts.rows if variants.num_rows else 0)
    workers = range_workers(config.cluster, rollouts.rows + verdicts.rows)

    def spread() -> dict:
        named = {"problems": pool, "variants": [variants], "stats": [stats], "rollouts": [rollouts], "verdicts": [verdicts]}
        if variants.num_rows:  # as in one process: the synthesize stage's rollouts are read only for kept variants
            named["rollouts"].append(variant_rollouts)
            named["verdicts"].append(variant_verdicts)
        searched = pc.unique(nodes["problem_id"]) if nodes.num_rows else None
        made = spread_stage(run, round, "pairs", inputs, named, pairs_boundaries(stats, variant_ids, total),
                            partial(made_of_range, config.pairs, variant_ids, ("pairs", "sft_examples"), searched=searched),
                            ("pairs", "sft_examples"), workers, keep_keys={id(variant_rollouts): kept})
        kept_variant_rows[0] = made.rows["rollouts"] - rollouts.rows
        if not nodes.num_rows:
            return dict(made.parts)
        questions = made.returned.get("searched_questions")
        if questions is not None:
            searched_questions.update(zip(questions["problem_id"].to_pylist(), questions["question"].to_pylist()))
        step = build_step_pairs(nodes, searched_questions, config.pairs)
        return {"pairs": WrittenParts(made.parts["pairs"].parts, more=step), "sft_examples": made.parts["sft_examples"]}

    def compute(_chunks) -> dict:
        if workers > 1:
            return spread()
        made = pairs_and_sft(all_problems(), stats, all_rollouts(), all_verdicts(), config.pairs, variant_ids, total)
        if nodes.num_rows:
            made = itertools.chain(made, step_pairs())
        both = Interleaved(made)  # one pass over the rollouts and verdicts writes both tables
        return {"pairs": both, "sft_examples": both}

    return execute_stage(
        run, round, "pairs",
        config_hash=config_hash(config.pairs),
        model_id=None,
        input_fingerprint=inputs,
        rows_in=lambda: rollouts.rows + kept_variant_rows[0] + nodes.num_rows,
        compute=compute,
        force=force,
    )
