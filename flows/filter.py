"""filter flow: the round's `verdicts` -> `problem_stats` (accuracy, pass@k, bucket, and the collapse
signals: distinct answers, mean log-probability), counted per
problem by DuckDB over the verdicts and rollouts as they stream from the lake, a range of problems
at a time."""
from __future__ import annotations

from functools import partial

from prefect import flow

from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import StageInputs, problem_pool, round_stream, stage_config
from evoforge.flows.spread import range_workers, spread_stage
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.filter import filter_boundaries, problem_stats_batches, stats_of_range


@flow(name="filter", flow_run_name="{run}/round-{round}/filter")
def filter_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    verdicts = round_stream(run, round, "verdicts", "verify", ["rollout_id", "problem_id", "verdict",
                                                                "extracted_answer"])
    rollouts = round_stream(run, round, "rollouts", "generate", ["rollout_id", "problem_id", "completion_tokens",
                                                                 "mean_logprob"])
    # the pool's problem ids split a large round into ranges of problems, counted one at a time
    problem_ids = problem_pool(run, round, ["problem_id"])["problem_id"]  # an Arrow column: millions are cheap
    inputs = StageInputs(verdicts, rollouts)

    workers = range_workers(config.cluster, verdicts.rows + rollouts.rows)

    def compute(_chunks) -> dict:
        if workers == 1:
            return {"problem_stats": problem_stats_batches(
                inputs.reader(verdicts), inputs.reader(rollouts), config.filter, problem_ids, verdicts.rows)}
        spread = spread_stage(run, round, "filter", inputs, {"verdicts": [verdicts], "rollouts": [rollouts]},
                              filter_boundaries(problem_ids, verdicts.rows), partial(stats_of_range, config.filter),
                              ("problem_stats",), workers)
        return {"problem_stats": spread.parts["problem_stats"]}

    return execute_stage(
        run, round, "filter",
        config_hash=config_hash(config.filter),
        model_id=None,
        input_fingerprint=inputs,  # hashed as filter reads them: each read once
        rows_in=verdicts.rows,
        compute=compute,
        force=force,
    )
