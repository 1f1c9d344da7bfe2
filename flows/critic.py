"""critic flow (RARO): the round's `rollouts` of problems with an expert answer -> `judgments`, judged
by the round's policy in its critic role."""
from __future__ import annotations

import pyarrow.compute as pc
from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problems_with_experts, round_table, stage_config
from evoforge.flows.prefect_tasks import judge
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for
from evoforge.tasks.progress import flow_run_logger


@flow(name="critic", flow_run_name="{run}/round-{round}/critic")
def critic_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    problems = problems_with_experts(run, round)
    rollouts = round_table(run, round, "rollouts", "generate", ["rollout_id", "problem_id", "text"])
    judged = rollouts.filter(pc.is_in(rollouts["problem_id"], problems["problem_id"]))
    if judged.num_rows < rollouts.num_rows:
        flow_run_logger().info(f"critic (run {run}, round {round}): {rollouts.num_rows - judged.num_rows} of "
                          f"{rollouts.num_rows} rollouts answer problems without an expert answer; they are not judged")
    return execute_stage(
        run, round, "critic",
        config_hash=config_hash({"critic": config.critic.model_dump(mode="json"),
                                 "engine": config.engine.output_settings()}),
        model_id=model_id_for(config.engine),
        input_fingerprint=fingerprint_tables(judged, problems),
        rows_in=rollouts.num_rows,
        compute=lambda chunks: {"judgments": judge(problems, judged, load_engine(config.engine), config.critic, chunks)},
        force=force,
    )
