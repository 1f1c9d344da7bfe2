"""pairs flow: the round's graded rollouts -> DPO `pairs` and `sft_examples` (kept SvS variants
included); when the round ran the mcts stage, its trees add step pairs (kind 'step') for the PPM."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problem_pool, round_table, stage_config, stage_output
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.pairs import build_pairs, build_step_pairs


@flow(name="pairs", flow_run_name="{run}/round-{round}/pairs")
def pairs_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    problems = problem_pool(run, round).select(["problem_id", "question", "origin"])
    stats = round_table(run, round, "problem_stats", "filter").select(["problem_id", "bucket"])
    columns = ["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]
    rollouts = round_table(run, round, "rollouts", "generate").select(columns)
    verdicts = round_table(run, round, "verdicts", "verify").select(["rollout_id", "verdict"])
    # kept variants of this round: their correct solutions are SFT data too
    variants = stage_output(run, round, "problems", "synthesize").select(["problem_id", "question", "origin"])
    if variants.num_rows:
        kept = set(variants["problem_id"].to_pylist())
        extra = stage_output(run, round, "rollouts", "synthesize").select(columns)
        extra = extra.filter(pc.is_in(extra["problem_id"], pa.array(sorted(kept))))
        problems = pa.concat_tables([problems, variants])
        rollouts = pa.concat_tables([rollouts, extra])
        verdicts = pa.concat_tables([verdicts, stage_output(run, round, "verdicts", "synthesize").select(["rollout_id", "verdict"])])
    variant_ids = frozenset(variants["problem_id"].to_pylist())
    nodes = stage_output(run, round, "mcts_nodes", "mcts")
    questions = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))

    def compute(_chunks) -> dict[str, pa.Table]:
        tables = build_pairs(problems, stats, rollouts, verdicts, config.pairs, variant_ids)
        if nodes.num_rows:
            tables["pairs"] = pa.concat_tables([tables["pairs"], build_step_pairs(nodes, questions, config.pairs)])
        return tables

    return execute_stage(
        run, round, "pairs",
        config_hash=config_hash(config.pairs),
        model_id=None,
        input_fingerprint=fingerprint_tables(problems, stats, rollouts, verdicts, nodes),
        rows_in=rollouts.num_rows + nodes.num_rows,
        compute=compute,
        force=force,
    )
