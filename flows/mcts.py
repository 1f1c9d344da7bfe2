"""mcts flow (rStar-Math): the round's problems -> `mcts_nodes` (every node of every tree) and
`traces` (the best complete correct solutions), searched with the round's policy."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from evoforge.data.ids import fingerprint_tables
from evoforge.flows.config import RoundConfig, config_hash
from evoforge.flows.inputs import checkpoint, problem_pool, round_table, stage_config
from evoforge.flows.prefect_tasks import search
from evoforge.flows.stage_runner import StageResult, execute_stage
from evoforge.models.loader import load_engine, model_id_for
from evoforge.models.ppm import ppm_scorer
from evoforge.tasks.progress import flow_run_logger


def search_problems(run: str, round: int, config: RoundConfig) -> pa.Table:
    problems = problem_pool(run, round).select(["problem_id", "question", "answer"])
    if config.mcts.buckets:
        stats = round_table(run, round, "problem_stats", "filter")
        chosen = stats.filter(pc.is_in(stats["bucket"], pa.array(config.mcts.buckets)))["problem_id"]
        problems = problems.filter(pc.is_in(problems["problem_id"], chosen))
    problems = problems.sort_by("problem_id")
    return problems.slice(0, config.mcts.limit) if config.mcts.limit else problems


@flow(name="mcts", flow_run_name="{run}/round-{round}/mcts")
def mcts_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one; the round's policy either way."""
    config = stage_config(run, round, config)
    problems = search_problems(run, round, config)
    ppm = None
    if config.mcts.use_ppm and round > 0:  # rStar-Math rounds 2+: the PPM trained in the round before
        ppm = checkpoint(run, round - 1, "ppm")
        if ppm is None:
            flow_run_logger().warning(f"mcts (run {run}, round {round}): use_ppm is set but round {round - 1} trained no "
                                 "PPM; terminal rewards only")
    return execute_stage(
        run, round, "mcts",
        config_hash=config_hash({"mcts": config.mcts.model_dump(mode="json"),
                                 "verify": config.verify.grading_settings()}),
        model_id=model_id_for(config.engine) + (f"+{ppm['model_id']}" if ppm else ""),
        input_fingerprint=fingerprint_tables(problems),
        rows_in=problems.num_rows,
        compute=lambda _chunks: search(problems, load_engine(config.engine), config.mcts, config.verify, round,
                                       step_scorer=ppm_scorer(ppm)),
        force=force,
    )
