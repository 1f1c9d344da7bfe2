"""generate flow: the round's problem pool -> `rollouts`."""
from __future__ import annotations

from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problem_pool, stage_config
from evoforge.flows.prefect_tasks import generate
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for


@flow(name="generate", flow_run_name="{run}/round-{round}/generate")
def generate_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    pool = problem_pool(run, round).select(["problem_id", "question"])
    return execute_stage(
        run, round, "generate",
        config_hash=config_hash({"generate": config.generate.model_dump(mode="json"),
                                 "engine": config.engine.output_settings()}),
        model_id=model_id_for(config.engine),
        input_fingerprint=fingerprint_tables(pool),
        rows_in=pool.num_rows,
        compute=lambda chunks: {"rollouts": generate(pool, load_engine(config.engine), config.generate, chunks)},
        force=force,
    )
