"""synthesize flow (SvS): under-performing problems' correct rollouts -> `variants`, their solving
`rollouts` and `verdicts`, and the kept variants as next round's `problems`."""
from __future__ import annotations

from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import problem_pool, round_table, stage_config
from evoforge.flows.prefect_tasks import synthesize
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for


@flow(name="synthesize", flow_run_name="{run}/round-{round}/synthesize")
def synthesize_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    problems = problem_pool(run, round).select(["problem_id", "question", "answer"])
    stats = round_table(run, round, "problem_stats", "filter", ["problem_id", "bucket"])
    rollouts = round_table(run, round, "rollouts", "generate", ["rollout_id", "problem_id", "sample_index", "text"])
    verdicts = round_table(run, round, "verdicts", "verify", ["rollout_id", "verdict"])
    return execute_stage(
        run, round, "synthesize",
        config_hash=config_hash({"synthesize": config.synthesize.model_dump(mode="json"),
                                 "generate": config.generate.model_dump(mode="json"),
                                 "verify": config.verify.grading_settings()}),
        model_id=model_id_for(config.engine),
        input_fingerprint=fingerprint_tables(problems, stats, rollouts, verdicts),
        rows_in=stats.num_rows,
        compute=lambda chunks: synthesize(problems, stats, rollouts, verdicts, load_engine(config.engine),
                                          config.synthesize, config.generate, config.verify, chunks),
        force=force,
    )
