"""verify flow: the round's `rollouts` -> `verdicts`, streamed: rollouts are read part by part and
verdicts written as they are graded, so memory does not grow with the round."""
from __future__ import annotations

from prefect import flow

from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import StageInputs, problem_pool, round_stream, stage_config
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.tasks.verify import verify_batches


@flow(name="verify", flow_run_name="{run}/round-{round}/verify")
def verify_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    config.verify.pool()  # the process's graders start in the background while the input is found and read
    rollouts = round_stream(run, round, "rollouts", "generate", ["rollout_id", "problem_id", "text"])
    golds = problem_pool(run, round, ["problem_id", "answer"]).select(["problem_id", "answer"])
    inputs = StageInputs(rollouts, golds)
    return execute_stage(
        run, round, "verify",
        config_hash=config_hash(config.verify.grading_settings()),
        model_id=None,
        input_fingerprint=inputs,  # hashed as verify reads the rollouts: read once
        rows_in=rollouts.rows,
        compute=lambda chunks: {"verdicts": verify_batches(inputs.reader(rollouts), golds, config.verify, chunks,
                                                           total=rollouts.rows)},
        force=force,
    )
