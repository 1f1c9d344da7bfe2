"""The round flow: ingest (round 0) -> generate -> verify -> filter, each stage a subflow that can also run alone."""
from __future__ import annotations

from prefect import flow

from flows.config import RoundConfig
from flows.filter import filter_flow
from flows.generate import generate_flow
from flows.ingest import ingest_flow
from flows.stage_runner import StageResult
from flows.verify import verify_flow

STAGES = {"generate": generate_flow, "verify": verify_flow, "filter": filter_flow}


@flow(name="round", flow_run_name="{run}/round-{round}")
def round_flow(run: str, config: RoundConfig, round: int = 0, force: bool = False) -> list[StageResult]:
    results: list[StageResult] = []
    if round == 0:
        for source in config.sources:
            results.append(ingest_flow(run, source, config.eval_sets, config.verify, force=force))
    for stage in STAGES.values():
        results.append(stage(run, round, config, force=force))
    return results
