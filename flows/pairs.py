"""pairs flow: the round's graded rollouts -> DPO `pairs` and `sft_examples` (kept SvS variants
included); when the round ran the mcts stage, its trees add step pairs (kind 'step') for the PPM."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from flows.config import RoundConfig, config_hash
from flows.generate import problem_pool
from flows.policy import stage_config
from flows.stage_runner import StageResult, execute_stage, fingerprint_inputs, lake
from flows.verify import round_table
from tasks.pairs import build_pairs, build_step_pairs


@flow(name="pairs", flow_run_name="{run}/round-{round}/pairs")
def pairs_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one and the round's policy."""
    config = stage_config(run, round, config)
    store = lake()
    problems = problem_pool(run, round).select(["problem_id", "question", "origin"])
    stats = round_table(run, round, "problem_stats", "filter").select(["problem_id", "bucket"])
    columns = ["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]
    rollouts = round_table(run, round, "rollouts", "generate").select(columns)
    verdicts = round_table(run, round, "verdicts", "verify").select(["rollout_id", "verdict"])
    # kept variants of this round: their correct solutions are SFT data too
    variants = store.read(run, "problems", round, "synthesize").select(["problem_id", "question", "origin"])
    if variants.num_rows:
        kept = set(variants["problem_id"].to_pylist())
        extra = store.read(run, "rollouts", round, "synthesize").select(columns)
        extra = extra.filter(pc.is_in(extra["problem_id"], pa.array(sorted(kept))))
        problems = pa.concat_tables([problems, variants])
        rollouts = pa.concat_tables([rollouts, extra])
        verdicts = pa.concat_tables([verdicts, store.read(run, "verdicts", round, "synthesize").select(["rollout_id", "verdict"])])
    variant_ids = frozenset(variants["problem_id"].to_pylist())
    nodes = store.read(run, "mcts_nodes", round, "mcts").drop_columns(["round", "stage"])
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
        input_fingerprint=fingerprint_inputs(problems, stats, rollouts, verdicts, nodes),
        rows_in=rollouts.num_rows + nodes.num_rows,
        compute=compute,
        force=force,
    )
