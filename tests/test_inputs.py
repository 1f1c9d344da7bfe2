"""The input layer (flows/inputs.py): what a stage reads, on a lake written by hand."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pytest

from evoforge.data import schemas
from evoforge.data.lake import lake
from evoforge.flows.config import RoundConfig
from evoforge.flows.inputs import (MissingInput, checkpoint, policy_for_round, problem_pool, round_table, run_config,
                                   stage_config)

pytestmark = pytest.mark.unit


def problems(*ids: str) -> pa.Table:
    return pa.Table.from_pylist([dict(problem_id=p, question=f"question {p}", answer="1", origin="seed") for p in ids],
                                schema=schemas.PROBLEMS)


def finished(run: str, round: int, stage: str) -> None:
    now = datetime.now(timezone.utc)
    lake().append_run_table(run, "stage_runs", pa.Table.from_pylist([dict(
        stage_run_id=f"{stage}-{round}", run=run, round=round, stage=stage, status="completed",
        started_at=now, finished_at=now)], schema=schemas.STAGE_RUNS))


def test_a_missing_input_names_the_stage_to_run_but_an_empty_output_of_a_finished_stage_is_data(runs_root):
    with pytest.raises(MissingInput, match="evoforge stage pairs --run r --round 0"):
        round_table("r", 0, "sft_examples", "pairs")
    lake().publish_stage("r", 0, "pairs", {"sft_examples": schemas.SFT_EXAMPLES.empty_table()})
    finished("r", 0, "pairs")  # pairs ran and found no correct answer to learn from
    assert round_table("r", 0, "sft_examples", "pairs").num_rows == 0


def test_the_pool_of_a_round_is_the_seeds_and_the_variants_kept_before_it(runs_root):
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": problems("a", "b")})
    store.publish_stage("r", 0, "synthesize", {"problems": problems("v0")})
    store.publish_stage("r", 1, "synthesize", {"problems": problems("v1")})
    assert sorted(problem_pool("r", 0)["problem_id"].to_pylist()) == ["a", "b"]
    assert sorted(problem_pool("r", 1)["problem_id"].to_pylist()) == ["a", "b", "v0"]
    assert sorted(problem_pool("r", 2)["problem_id"].to_pylist()) == ["a", "b", "v0", "v1"]
    with pytest.raises(MissingInput, match="ingest a source first"):
        problem_pool("empty", 0)


def test_a_round_runs_the_policy_the_round_before_trained(runs_root):
    rows = [dict(checkpoint_id=f"r0-{role}", role=role, method=role, path=f"/models/{role}") for role in ("policy", "ppm")]
    lake().publish_stage("r", 0, "finetune", {"checkpoints": pa.Table.from_pylist(rows, schema=schemas.CHECKPOINTS)})
    assert checkpoint("r", 0, "ppm")["path"] == "/models/ppm" and checkpoint("r", 1, "policy") is None
    config = RoundConfig()
    assert policy_for_round("r", config, 0).engine.model == config.engine.model  # round 0: the starting model
    assert policy_for_round("r", config, 1).engine.model == "/models/policy"
    with pytest.raises(ValueError, match="no saved config"):
        stage_config("r", 1, None)
    run_config("r", config)  # a given config is saved into the run, for later single-stage reruns
    assert stage_config("r", 1, None).engine.model == "/models/policy"
