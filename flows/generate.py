"""generate flow: the round's problem pool -> `rollouts`."""
from __future__ import annotations

from prefect import flow

from flows.config import RoundConfig, config_hash
from flows.policy import stage_config
from flows.stage_runner import MissingInput, StageResult, execute_stage, fingerprint_inputs, lake
from models.engine import load_engine, model_id_for
from tasks.generate import generate


def problem_pool(run: str, round_: int):
    """P_r: the ingested problems plus the SvS variants kept in rounds before r."""
    import pyarrow.compute as pc

    problems = lake().read(run, "problems")
    seeds = pc.equal(problems["stage"], "ingest")
    earlier_variants = pc.and_(pc.equal(problems["stage"], "synthesize"), pc.less(problems["round"], round_))
    problems = problems.filter(pc.or_(seeds, earlier_variants))
    if problems.num_rows == 0:
        raise MissingInput(f"run {run!r} has no problems for round {round_}: ingest a source first (evoforge ingest PATH --run {run})")
    return problems


@flow(name="generate", flow_run_name="{run}/round-{round}/generate")
def generate_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one and the round's policy."""
    config = stage_config(run, round, config)
    problems = problem_pool(run, round)
    model_id = model_id_for(config.engine)
    pool = problems.select(["problem_id", "question"])
    return execute_stage(
        run, round, "generate",
        config_hash=config_hash({"generate": config.generate.model_dump(mode="json"),
                                 "engine": config.engine.model_dump(mode="json")}),
        model_id=model_id,
        input_fingerprint=fingerprint_inputs(pool),
        rows_in=problems.num_rows,
        compute=lambda chunks: {"rollouts": generate(pool, load_engine(config.engine), config.generate, chunks)},
        force=force,
    )
