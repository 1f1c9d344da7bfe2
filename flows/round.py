"""The round flow: ingest (round 0) -> generate -> verify -> filter -> synthesize -> mcts -> critic -> pairs
-> finetune -> evaluate (the config's `stages` pick which run), each stage a subflow that can also run alone.
`evolve_flow` chains rounds: each starts from the previous round's checkpoint and grown pool.

Both are deployable (deploy/prefect.yaml, `evoforge serve`): with no `round`, a round flow runs the
run's next unfinished round, so a cron schedule keeps a run evolving one round per tick.
"""
from __future__ import annotations

from prefect import flow

from flows.artifacts import publish_round_report
from flows.config import RoundConfig
from flows.critic import critic_flow
from flows.evaluate import evaluate_flow
from flows.filter import filter_flow
from flows.finetune import finetune_flow
from flows.generate import generate_flow
from flows.ingest import ingest_flow
from flows.mcts import mcts_flow
from flows.pairs import pairs_flow
from flows.policy import next_round, policy_for_round, run_config
from flows.stage_runner import StageResult, lake, run_guard
from flows.synthesize import synthesize_flow
from flows.verify import verify_flow
from tasks.progress import run_logger

STAGES = {
    "generate": generate_flow, "verify": verify_flow, "filter": filter_flow, "synthesize": synthesize_flow,
    "mcts": mcts_flow, "critic": critic_flow, "pairs": pairs_flow, "finetune": finetune_flow, "evaluate": evaluate_flow,
}


def _round_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"{params['run']}/round-{params['round'] if params.get('round') is not None else 'next'}"


def _name_flow_run(name: str) -> None:
    """A scheduled run learns its round only once it starts: show it in the UI under that name."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        if flow_run.id:
            with get_client(sync_client=True) as client:
                client.update_flow_run(flow_run.id, name=name)
    except Exception as err:  # a name is cosmetic; never fail a round over it
        run_logger().debug(f"could not rename the flow run to {name}: {err}")


@flow(name="round", flow_run_name=_round_run_name)
def round_flow(run: str, config: RoundConfig | None = None, round: int | None = None, force: bool = False,
               config_file: str | None = None) -> list[StageResult]:
    """One round of `run`. Config: `config`, else `config_file`, else the run's saved config.
    Round: `round`, else the run's next unfinished one. The engine loads round - 1's checkpoint."""
    config = run_config(run, config, config_file)
    with run_guard(run, "round"):
        round_ = next_round(run, config) if round is None else round
        if round is None:
            _name_flow_run(f"{run}/round-{round_}")
        config = policy_for_round(run, config, round_)
        run_logger().info(f"run {run}, round {round_}: stages {', '.join(config.stages)}; policy {config.engine.model}")
        results: list[StageResult] = []
        if round_ == 0:
            for source in config.sources:
                results.append(ingest_flow(run, source, config.eval_sets, config.verify, force=force))
        for name in config.stages:
            results.append(STAGES[name](run, round_, config, force=force))
    if any(name in config.stages for name in ("filter", "evaluate")):
        publish_round_report(run, round_, lake().run_dir(run))
    return results


@flow(name="evolve", flow_run_name="{run}/evolve-{rounds}")
def evolve_flow(run: str, rounds: int, config: RoundConfig | None = None, force: bool = False,
                config_file: str | None = None) -> list[StageResult]:
    """Rounds 0 .. rounds - 1 of `run`, each on the previous round's checkpoint and grown pool."""
    config = run_config(run, config, config_file)
    results: list[StageResult] = []
    for round_ in range(rounds):
        results += round_flow(run, config, round=round_, force=force)
    return results
