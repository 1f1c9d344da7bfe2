"""verify flow: the round's `rollouts` -> `verdicts`."""
from __future__ import annotations

from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problem_pool, round_table, stage_config
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.verify import verify


@flow(name="verify", flow_run_name="{run}/round-{round}/verify")
def verify_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    rollouts = round_table(run, round, "rollouts", "generate").select(["rollout_id", "problem_id", "text"])
    golds = problem_pool(run, round).select(["problem_id", "answer"])
    return execute_stage(
        run, round, "verify",
        config_hash=config_hash(config.verify.grading_settings()),
        model_id=None,
        input_fingerprint=fingerprint_tables(rollouts, golds),
        rows_in=rollouts.num_rows,
        compute=lambda chunks: {"verdicts": verify(rollouts, golds, config.verify, chunks)},
        force=force,
    )
