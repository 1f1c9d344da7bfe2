"""filter flow: the round's `verdicts` -> `problem_stats` (accuracy, pass@k, bucket)."""
from __future__ import annotations

from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import round_table, stage_config
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.filter import filter_problems


@flow(name="filter", flow_run_name="{run}/round-{round}/filter")
def filter_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    verdicts = round_table(run, round, "verdicts", "verify").select(["rollout_id", "problem_id", "verdict"])
    rollouts = round_table(run, round, "rollouts", "generate").select(["rollout_id", "completion_tokens"])
    return execute_stage(
        run, round, "filter",
        config_hash=config_hash(config.filter),
        model_id=None,
        input_fingerprint=fingerprint_tables(verdicts, rollouts),
        rows_in=verdicts.num_rows,
        compute=lambda _chunks: {"problem_stats": filter_problems(verdicts, rollouts, config.filter)},
        force=force,
    )
