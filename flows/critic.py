"""critic flow (RARO): the round's `rollouts` of problems with an expert answer -> `judgments`, judged
by the round's policy in its critic role."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from flows.config import RoundConfig, config_hash
from flows.generate import problem_pool
from flows.policy import stage_config
from flows.stage_runner import MissingInput, StageResult, execute_stage, fingerprint_inputs
from flows.verify import round_table
from models.engine import load_engine, model_id_for
from tasks.critic import judge
from tasks.progress import run_logger


def problems_with_experts(run: str, round_: int) -> pa.Table:
    problems = problem_pool(run, round_).select(["problem_id", "question", "expert_answer"])
    problems = problems.filter(pc.invert(pc.is_null(problems["expert_answer"])))
    if problems.num_rows == 0:
        raise MissingInput(f"run {run!r} has no problems with an expert answer for the critic: ingest demonstrations "
                           f"(evoforge ingest PATH --run {run} --preset demonstrations) or a GSM8K/MATH source")
    return problems


@flow(name="critic", flow_run_name="{run}/round-{round}/critic")
def critic_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one and the round's policy."""
    config = stage_config(run, round, config)
    problems = problems_with_experts(run, round)
    rollouts = round_table(run, round, "rollouts", "generate").select(["rollout_id", "problem_id", "text"])
    judged = rollouts.filter(pc.is_in(rollouts["problem_id"], problems["problem_id"]))
    if judged.num_rows < rollouts.num_rows:
        run_logger().info(f"critic (run {run}, round {round}): {rollouts.num_rows - judged.num_rows} of "
                          f"{rollouts.num_rows} rollouts answer problems without an expert answer; they are not judged")
    return execute_stage(
        run, round, "critic",
        config_hash=config_hash({"critic": config.critic.model_dump(mode="json", exclude={"replay_size", "critic_share"}),
                                 "engine": config.engine.model_dump(mode="json")}),
        model_id=model_id_for(config.engine),
        input_fingerprint=fingerprint_inputs(judged, problems),
        rows_in=rollouts.num_rows,
        compute=lambda chunks: {"judgments": judge(problems, judged, load_engine(config.engine), config.critic, chunks)},
        force=force,
    )
