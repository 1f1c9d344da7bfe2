"""The round flow: ingest (round 0) -> generate -> verify -> filter -> synthesize -> pairs -> finetune
-> evaluate (the config's `stages` pick which run), each stage a subflow that can also run alone.
`evolve_flow` chains rounds: each starts from the previous round's checkpoint and grown pool."""
from __future__ import annotations

from prefect import flow

from flows.config import RoundConfig
from flows.evaluate import evaluate_flow
from flows.filter import filter_flow
from flows.finetune import finetune_flow, trained_checkpoint
from flows.generate import generate_flow
from flows.ingest import ingest_flow
from flows.pairs import pairs_flow
from flows.stage_runner import StageResult
from flows.synthesize import synthesize_flow
from flows.verify import verify_flow

STAGES = {
    "generate": generate_flow, "verify": verify_flow, "filter": filter_flow, "synthesize": synthesize_flow,
    "pairs": pairs_flow, "finetune": finetune_flow, "evaluate": evaluate_flow,
}


@flow(name="round", flow_run_name="{run}/round-{round}")
def round_flow(run: str, config: RoundConfig, round: int = 0, force: bool = False) -> list[StageResult]:
    results: list[StageResult] = []
    if round == 0:
        for source in config.sources:
            results.append(ingest_flow(run, source, config.eval_sets, config.verify, force=force))
    for name in config.stages:
        results.append(STAGES[name](run, round, config, force=force))
    return results


def policy_for_round(run: str, config: RoundConfig, round_: int) -> RoundConfig:
    """Round r's config: the engine loads the checkpoint trained in round r - 1, if there is one."""
    checkpoint = trained_checkpoint(run, round_ - 1) if round_ > 0 else None
    if checkpoint is None:
        return config
    return config.model_copy(update={"engine": config.engine.model_copy(update={"model": checkpoint["path"]})})


@flow(name="evolve", flow_run_name="{run}/evolve-{rounds}")
def evolve_flow(run: str, config: RoundConfig, rounds: int, force: bool = False) -> list[StageResult]:
    results: list[StageResult] = []
    for round_ in range(rounds):
        results += round_flow(run, policy_for_round(run, config, round_), round=round_, force=force)
    return results
