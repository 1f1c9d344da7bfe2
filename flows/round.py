"""The round flow: ingest (round 0), then the config's `stages` in order (flows/stages.py), each a
subflow that can also run alone. `evolve_flow` chains rounds: each starts from the last promoted
checkpoint (the evaluate stage's gate, or `evoforge promote`) and the grown pool. `stage_flow` reruns
one stage by name (one deployment for all stages).

All three are deployable (deploy/prefect.yaml, `evoforge serve`): with no `round`, a round flow runs
the run's next unfinished round, so a cron schedule keeps a run evolving one round per tick.

A stage the config assigns to a work pool (`cluster.pools`) runs as a flow run of `stage/<pool>` on a
worker of that pool, on another machine (flows/dispatch.py); the round then holds the run's
orchestrator lock, and the run's own lock only around what it does itself. With no pools, the round
holds the run's lock throughout, as a round on one machine always did.
"""
from __future__ import annotations

from contextlib import ExitStack

from prefect import flow

from evoforge.data.lake import lake
from evoforge.flows.artifacts import publish_round_report
from evoforge.flows.config import RoundConfig
from evoforge.flows.critic import critic_flow
from evoforge.flows.dispatch import dispatch_stage, orchestrating, uses_pools
from evoforge.flows.evaluate import evaluate_flow
from evoforge.flows.filter import filter_flow
from evoforge.flows.finetune import finetune_flow
from evoforge.flows.generate import generate_flow
from evoforge.flows.ingest import ingest_flow
from evoforge.flows.inputs import next_round, round_policy, run_config, with_policy
from evoforge.flows.mcts import mcts_flow
from evoforge.flows.pairs import pairs_flow
from evoforge.flows.stage_runner import StageResult, run_guard
from evoforge.flows.stages import STAGES, StageName
from evoforge.flows.synthesize import synthesize_flow
from evoforge.flows.verify import verify_flow
from evoforge.tasks.progress import flow_run_logger


# each stage's Prefect flow, by its name in the registry (tests/test_structure.py keeps the two in step)
STAGE_FLOWS = {"ingest": ingest_flow, "generate": generate_flow, "verify": verify_flow, "filter": filter_flow,
               "synthesize": synthesize_flow, "mcts": mcts_flow, "critic": critic_flow, "pairs": pairs_flow,
               "finetune": finetune_flow, "evaluate": evaluate_flow}


def _round_flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    return f"{params['run']}/round-{params['round'] if params.get('round') is not None else 'next'}"


def _rename_flow_run(name: str) -> None:
    """A scheduled flow run learns its round only once it starts: show it in the UI under that name."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        if flow_run.id:
            with get_client(sync_client=True) as client:
                client.update_flow_run(flow_run.id, name=name)
    except Exception as err:  # a name is cosmetic; never fail a round over it
        flow_run_logger().debug(f"could not rename the flow run to {name}: {err}")


def run_stage(name: str, run: str, round: int, config: RoundConfig | None, force: bool) -> list[StageResult]:
    """One stage of one round; ingest reads every source of the config (round 0)."""
    if STAGES[name].in_round:
        return [STAGE_FLOWS[name](run, round, config, force=force)]
    config = config if config is not None else run_config(run)
    return [ingest_flow(run, source, config.eval_sets, config.verify, force=force) for source in config.sources]


@flow(name="round", flow_run_name=_round_flow_run_name)
def round_flow(run: str, config: RoundConfig | None = None, round: int | None = None, force: bool = False,
               config_file: str | None = None) -> list[StageResult]:
    """One round of `run`. Config: `config`, else `config_file`, else the run's saved one.
    Round: `round`, else the run's next unfinished one. The engine loads round - 1's checkpoint.
    Stages with a work pool (`cluster.pools`) run on that pool's workers; the rest in this process."""
    with orchestrating(run, f"round {round if round is not None else '(next)'}"), ExitStack() as held:
        held.enter_context(run_guard(run, "round"))
        config = run_config(run, config, config_file)  # saved into the run under its lock, before any dispatch
        if round is None:
            round = next_round(run, config)
            _rename_flow_run(f"{run}/round-{round}")
        names = (["ingest"] if round == 0 else []) + list(config.stages)
        chosen = round_policy(run, config, round)
        policy = with_policy(config, chosen).engine.model
        passed = f" (model {chosen.model_round}; rejected since: {'; '.join(chosen.passed_over)})" if chosen.passed_over else ""
        pools = {name: config.cluster.pools[name] for name in names if config.cluster.pools.get(name)}
        where = f"; in work pools: {', '.join(f'{n} -> {p}' for n, p in pools.items())}" if pools else ""
        flow_run_logger().info(f"run {run}, round {round}: stages {', '.join(config.stages)}; policy {policy}{passed}{where}")
        if pools:
            held.close()  # the stages take the run's lock themselves, on their machines
        results: list[StageResult] = []
        for name in names:
            if name in pools:
                results += dispatch_stage(name, run, round, force, pools[name], config.cluster)
            else:
                results += run_stage(name, run, round, config, force)
        if any(name in config.stages for name in ("filter", "evaluate")):  # its plot is a file of the run
            with run_guard(run, f"round {round} / report"):
                publish_round_report(run, round, lake().run_dir(run))
    return results


@flow(name="evolve", flow_run_name="{run}/evolve-{rounds}")
def evolve_flow(run: str, rounds: int, config: RoundConfig | None = None, force: bool = False,
                config_file: str | None = None) -> list[StageResult]:
    """Rounds 0 .. rounds - 1 of `run`, each on the last promoted checkpoint (evaluate's gate) and grown pool."""
    results: list[StageResult] = []
    with orchestrating(run, "evolve"), ExitStack() as held:
        held.enter_context(run_guard(run, "evolve"))
        config = run_config(run, config, config_file)
        if uses_pools(config, ["ingest", *config.stages]):
            held.close()  # each round's dispatched stages take the run's lock on their machines
        for round in range(rounds):
            results += round_flow(run, config, round=round, force=force)
    return results


@flow(name="stage", flow_run_name="{run}/round-{round}/{stage}")
def stage_flow(stage: StageName, run: str, round: int = 0, force: bool = False) -> list[StageResult]:
    """Rerun one stage of one round with the run's saved config (force: recompute even when nothing changed)."""
    return run_stage(stage, run, round, None, force)
