"""verify flow: the round's `rollouts` -> `verdicts`."""
from __future__ import annotations

from prefect import flow

from flows.config import RoundConfig, config_hash
from flows.generate import problem_pool
from flows.policy import stage_config
from flows.stage_runner import MissingInput, StageResult, execute_stage, fingerprint_inputs, lake
from tasks.verify import verify


def round_table(run: str, round_: int, table: str, made_by: str):
    """`table` as stage `made_by` wrote it in this round (later stages may add their own rows)."""
    rows = lake().read(run, table, round_, made_by)
    if rows.num_rows == 0:
        raise MissingInput(
            f"run {run!r} round {round_} has no {table}: run `evoforge stage {made_by} --run {run} --round {round_}` first"
        )
    return rows


@flow(name="verify", flow_run_name="{run}/round-{round}/verify")
def verify_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one and the round's policy."""
    config = stage_config(run, round, config)
    rollouts = round_table(run, round, "rollouts", "generate").select(["rollout_id", "problem_id", "text"])
    golds = problem_pool(run, round).select(["problem_id", "answer"])
    return execute_stage(
        run, round, "verify",
        config_hash=config_hash(config.verify.grading_settings()),
        model_id=None,
        input_fingerprint=fingerprint_inputs(rollouts, golds),
        rows_in=rollouts.num_rows,
        compute=lambda chunks: {"verdicts": verify(rollouts, golds, config.verify, chunks)},
        force=force,
    )
