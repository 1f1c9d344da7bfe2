"""Shared fixtures, and the test tiers. Everything a test writes stays under the project (.tmp/,
.cache/), as in a real run.

Tiers (markers; `make test` runs all, `pytest -m unit` is the fast loop):
- unit: no model and no server, and quick; the whole tier runs in under a minute
- slow: no model and no server either, but seconds each: subprocesses and fresh interpreters, a wheel
  build, deadlines waited out, vLLM imported; kept out of the fast loop, `make test` runs them
- model: loads the tiny random model or the default model
- server: starts a server: Prefect (the test harness, `prefect server start`), the local S3 server
  (moto), PostgreSQL, or a browser
Every test carries at least one; unit and slow each stand alone (a test is one or the other, and
neither uses the model or server fixtures); a test that uses the model or server fixtures must carry
that tier.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from evoforge.data import home

home.configure()  # before Prefect, vLLM or torch are imported

TIERS = ("unit", "slow", "model", "server")
ALONE = ("unit", "slow")  # tiers that admit no other tier and no model or server fixture
MODEL_FIXTURES = {"tiny_model", "tiny_engine_config", "apples_round"}
SERVER_FIXTURES = {"prefect_server", "local_s3", "s3_runs"}


def pytest_collection_modifyitems(config, items):
    """A tier is a promise about cost: check it against the fixtures each test really uses."""
    wrong = []
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        fixtures = set(getattr(item, "fixturenames", ()))
        if not tiers:
            wrong.append(f"{item.nodeid}: no tier marker ({', '.join(TIERS)})")
        elif tiers & set(ALONE) and len(tiers) > 1:
            wrong.append(f"{item.nodeid}: marked {' and '.join(sorted(tiers))}; {' and '.join(ALONE)} each stand alone")
        elif tiers & set(ALONE) and fixtures & (MODEL_FIXTURES | SERVER_FIXTURES):
            wrong.append(f"{item.nodeid}: marked {next(iter(tiers))} but uses {sorted(fixtures & (MODEL_FIXTURES | SERVER_FIXTURES))}")
        elif fixtures & MODEL_FIXTURES and "model" not in tiers:
            wrong.append(f"{item.nodeid}: uses the model but is not marked model")
        elif fixtures & SERVER_FIXTURES and "server" not in tiers:
            wrong.append(f"{item.nodeid}: starts a Prefect server but is not marked server")
    if wrong:
        raise pytest.UsageError("test tiers:\n  " + "\n  ".join(wrong))


@pytest.fixture()
def scratch(request) -> Path:
    """A fresh folder under .tmp/ for one test (pytest's tmp_path would be under /tmp)."""
    path = home.home() / ".tmp" / "tests" / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def runs_root(scratch, monkeypatch) -> Path:
    """A lake of the test's own, for this process and the processes it starts."""
    from evoforge.data.lake import use_lake

    root = scratch / "runs"
    monkeypatch.setenv("EVOFORGE_RUNS", str(root))
    use_lake(root)
    yield root
    use_lake(None)


def _lake_on(disk_tier):
    @pytest.fixture(params=[pytest.param("disk", marks=disk_tier), pytest.param("s3", marks=pytest.mark.server)])
    def lake_on(request) -> str:
        """The test's lake (`runs_root`), or the same on the local S3 server (`s3_runs`, a server test)."""
        request.getfixturevalue("runs_root" if request.param == "disk" else "s3_runs")
        return request.param

    return lake_on


lake_on = _lake_on(pytest.mark.unit)  # a test run on both lakes: unit on disk, server on S3
lake_on_with_processes = _lake_on(pytest.mark.slow)  # the same for a test that starts processes


@pytest.fixture(scope="session")
def local_s3():
    """One local S3 server (moto, data/local_s3.py) for the session; each test makes its own bucket."""
    from evoforge.data.local_s3 import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture()
def s3_runs(local_s3, monkeypatch) -> str:
    """A lake of the test's own on the local S3 server (a fresh bucket), for this process and the
    processes it starts; the AWS variables point boto3, s3fs and pyarrow at it."""
    from evoforge.data.lake import use_lake

    for key, value in local_s3.environment().items():
        monkeypatch.setenv(key, value)
    root = f"s3://{local_s3.create_bucket(f'lake-{uuid.uuid4().hex[:12]}')}/runs"
    monkeypatch.setenv("EVOFORGE_RUNS", root)
    use_lake(root)
    yield root
    use_lake(None)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API (with its own database under .tmp/) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from evoforge.models.tiny import tiny_model_folder

    return tiny_model_folder()


@pytest.fixture(scope="session")
def tiny_engine_config(tiny_model):
    from evoforge.models.engine import EngineConfig

    return EngineConfig(model=str(tiny_model), backend="vllm", max_model_len=1024)


@pytest.fixture()
def apples_round(tiny_engine_config, scratch, write_jsonl):
    """A small round config on the tiny model: 5 one-step word problems and one line that is not JSON,
    4 samples each, generate -> verify -> filter."""
    from evoforge.flows.config import RoundConfig
    from evoforge.models.engine import SamplingConfig
    from evoforge.tasks.generate import GenerateConfig
    from evoforge.tasks.ingest import SourceConfig

    source = write_jsonl(scratch / "pool.jsonl", [
        {"question": f"Ann has {i} apples and buys {i + 2} more. How many apples does she have?", "answer": str(2 * i + 2)}
        for i in range(5)
    ] + ["not json"])
    return RoundConfig(
        engine=tiny_engine_config,
        sources=[SourceConfig(path=str(source), preset="plain", name="apples")],
        generate=GenerateConfig(sampling=SamplingConfig(n=4, max_tokens=24, seed=1), batch_problems=2),
        stages=["generate", "verify", "filter"],
    )


@pytest.fixture()
def write_jsonl():
    """write_jsonl(path, lines): lines may be dicts (dumped as JSON), str (written as is) or bytes (written raw)."""
    def write(path: Path, lines: list) -> Path:
        with open(path, "wb") as fh:
            for line in lines:
                if isinstance(line, dict):
                    line = json.dumps(line)
                fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
        return path

    return write


class ScriptedEngine:
    """A test double of the engine (models/engine.py's interface) whose text a test writes:
    `reply(request, n)` returns the n samples of one request, as Completions or plain strings (plain
    strings get 10 tokens, finish reason 'stop', mean log-prob -0.5). It records the number of
    requests of every call, so a test can check how a stage batches its calls."""

    def __init__(self, reply, model_id: str = "scripted@test"):
        self.reply, self.model_id = reply, model_id
        self.calls: list[int] = []

    def generate(self, requests, sampling):
        from evoforge.models.engine import Completion

        self.calls.append(len(requests))
        return [[c if isinstance(c, Completion) else Completion(c, 10, "stop", -0.5) for c in self.reply(request, sampling.n)]
                for request in requests]


@pytest.fixture()
def scripted_engine():
    """ScriptedEngine(reply, model_id=...): see the class."""
    return ScriptedEngine


@pytest.fixture()
def graded_round():
    """A small graded round for the pairs and SFT selection: problems, stats, rollouts and verdicts of
    a mixed, a solved and an unsolved problem."""
    import pyarrow as pa

    from evoforge.data import schemas

    problems = pa.Table.from_pylist([
        dict(problem_id=p, question=f"question {p}", answer="1", source="t", source_file="f", source_row=i,
             origin="seed", parent_problem_id=None) for i, p in enumerate(["mixed", "solved", "unsolved"])
    ], schema=schemas.PROBLEMS)
    rows = [  # (rollout, problem, text, tokens, mean logprob, verdict)
        ("m1", "mixed", "long correct", 50, -0.5, "correct"),
        ("m2", "mixed", "short correct", 10, -0.9, "correct"),
        ("m3", "mixed", "short correct", 10, -0.8, "correct"),   # same text as m2: one SFT example
        ("m4", "mixed", "unsure wrong", 20, -2.0, "wrong"),
        ("m5", "mixed", "confident wrong", 20, -0.1, "wrong"),
        ("m6", "mixed", "no box", 20, -0.05, "no_answer"),
        ("s1", "solved", "right", 5, -0.1, "correct"),
        ("u1", "unsolved", "nope", 5, -0.1, "wrong"),
    ]
    rollouts = pa.table({"rollout_id": [r[0] for r in rows], "problem_id": [r[1] for r in rows],
                         "text": [r[2] for r in rows], "completion_tokens": [r[3] for r in rows],
                         "mean_logprob": [r[4] for r in rows]})
    verdicts = pa.table({"rollout_id": [r[0] for r in rows], "verdict": [r[5] for r in rows]})
    stats = pa.table({"problem_id": ["mixed", "solved", "unsolved"], "bucket": ["underperforming", "solved", "unsolved"]})
    return problems, stats, rollouts, verdicts


def pytest_report_header(config):
    return f"EVOFORGE_HOME={home.home()}  TMPDIR={os.environ.get('TMPDIR')}"
