"""pairs flow: the round's graded rollouts -> DPO `pairs` and `sft_examples` (kept SvS variants
included); when the round ran the mcts stage, its trees add step pairs (kind 'step') for the PPM.
Rollouts and verdicts stream from the lake (DuckDB ranks each problem's rollouts); the problems,
stats and trees are held."""
from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import (fingerprint_inputs, problem_pool, round_stream, round_table, stage_config,
                                   stage_output, stage_stream)
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.pairs import build_step_pairs, sft_selection, solution_pairs

ROLLOUT_COLUMNS = ["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]


@flow(name="pairs", flow_run_name="{run}/round-{round}/pairs")
def pairs_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    problems = problem_pool(run, round, ["problem_id", "question", "origin"]).select(["problem_id", "question", "origin"])
    stats = round_table(run, round, "problem_stats", "filter").select(["problem_id", "bucket"])
    rollouts = round_stream(run, round, "rollouts", "generate", ROLLOUT_COLUMNS)
    verdicts = round_stream(run, round, "verdicts", "verify", ["rollout_id", "problem_id", "verdict"])
    # kept variants of this round: their correct solutions are SFT data too
    variants = stage_output(run, round, "problems", "synthesize").select(["problem_id", "question", "origin"])
    variant_rollouts = stage_stream(run, round, "rollouts", "synthesize", ROLLOUT_COLUMNS)
    variant_verdicts = stage_stream(run, round, "verdicts", "synthesize", ["rollout_id", "problem_id", "verdict"])
    kept = pa.array(sorted(set(variants["problem_id"].to_pylist())), pa.string())
    if variants.num_rows:
        problems = pa.concat_tables([problems, variants])
    variant_ids = frozenset(kept.to_pylist())
    nodes = stage_output(run, round, "mcts_nodes", "mcts")
    questions = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))

    def kept_rollouts(reader: pa.RecordBatchReader):
        for batch in reader:
            yield batch.filter(pc.is_in(batch["problem_id"], kept))

    def all_rollouts() -> pa.RecordBatchReader:
        own = rollouts.reader()
        extra = kept_rollouts(variant_rollouts.reader()) if variants.num_rows else ()
        return pa.RecordBatchReader.from_batches(own.schema, itertools.chain(own, extra))

    def all_verdicts() -> pa.RecordBatchReader:
        own = verdicts.reader()
        extra = variant_verdicts.reader() if variants.num_rows else ()
        return pa.RecordBatchReader.from_batches(own.schema, itertools.chain(own, extra))

    def compute(_chunks) -> dict:
        total = rollouts.rows + kept_variant_rows
        pairs = solution_pairs(problems, all_rollouts(), all_verdicts(), config.pairs, total)
        if nodes.num_rows:
            pairs = itertools.chain(pairs, [build_step_pairs(nodes, questions, config.pairs)])
        return {"pairs": pairs,  # two passes over the streams: each output table is written whole in turn
                "sft_examples": sft_selection(problems, stats, all_rollouts(), all_verdicts(), config.pairs,
                                              variant_ids, total)}

    variant_problem_ids = stage_stream(run, round, "rollouts", "synthesize", ["problem_id"])
    kept_variant_rows = sum(pc.sum(pc.is_in(batch["problem_id"], kept)).as_py() or 0
                            for batch in variant_problem_ids.reader()) if variants.num_rows else 0
    return execute_stage(
        run, round, "pairs",
        config_hash=config_hash(config.pairs),
        model_id=None,
        input_fingerprint=fingerprint_inputs(problems, stats, rollouts, verdicts, variant_rollouts, variant_verdicts,
                                             nodes),
        rows_in=rollouts.rows + kept_variant_rows + nodes.num_rows,
        compute=compute,
        force=force,
    )
