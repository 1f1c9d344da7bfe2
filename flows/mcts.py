"""mcts flow (rStar-Math): the round's problems -> `mcts_nodes` (every node of every tree) and
`traces` (the best complete correct solutions), searched with the round's policy."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow

from flows.config import RoundConfig, config_hash
from flows.generate import problem_pool
from flows.policy import stage_config
from flows.stage_runner import StageResult, execute_stage, fingerprint_inputs, lake
from flows.verify import round_table
from models.engine import load_engine, model_id_for
from tasks.mcts import search
from tasks.progress import run_logger


def search_problems(run: str, round_: int, config: RoundConfig) -> pa.Table:
    problems = problem_pool(run, round_).select(["problem_id", "question", "answer"])
    if config.mcts.buckets:
        stats = round_table(run, round_, "problem_stats", "filter")
        chosen = stats.filter(pc.is_in(stats["bucket"], pa.array(config.mcts.buckets)))["problem_id"]
        problems = problems.filter(pc.is_in(problems["problem_id"], chosen))
    problems = problems.sort_by("problem_id")
    return problems.slice(0, config.mcts.limit) if config.mcts.limit else problems


def previous_ppm(run: str, round_: int) -> dict | None:
    """The PPM trained in the round before (rStar-Math rounds 2+), if there is one."""
    if round_ == 0:
        return None
    rows = [r for r in lake().read(run, "checkpoints", round_ - 1, "finetune").to_pylist() if r["role"] == "ppm"]
    if not rows:
        run_logger().warning(f"mcts (run {run}, round {round_}): use_ppm is set but round {round_ - 1} trained no PPM; "
                             "terminal rewards only")
    return rows[0] if rows else None


def _scorer(ppm: dict | None):
    if ppm is None:
        return None
    from models.ppm import PPMScorer

    return PPMScorer(ppm["path"])


@flow(name="mcts", flow_run_name="{run}/round-{round}/mcts")
def mcts_flow(run: str, round: int, config: RoundConfig | None = None, force: bool = False) -> StageResult:
    """Rerunnable alone: with no config, the run's saved one and the round's policy."""
    config = stage_config(run, round, config)
    problems = search_problems(run, round, config)
    ppm = previous_ppm(run, round) if config.mcts.use_ppm else None
    return execute_stage(
        run, round, "mcts",
        config_hash=config_hash({"mcts": config.mcts.model_dump(mode="json"),
                                 "verify": config.verify.grading_settings()}),
        model_id=model_id_for(config.engine) + (f"+{ppm['model_id']}" if ppm else ""),
        input_fingerprint=fingerprint_inputs(problems),
        rows_in=problems.num_rows,
        compute=lambda _chunks: search(problems, load_engine(config.engine), config.mcts, config.verify, round,
                                       step_scorer=_scorer(ppm)),
        force=force,
    )
