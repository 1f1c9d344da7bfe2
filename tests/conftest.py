"""Shared fixtures. Everything a test writes stays under the project (.tmp/, .cache/), as in a real run."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from data import home

home.configure()  # before Prefect, vLLM or torch are imported

import shutil  # noqa: E402


@pytest.fixture()
def scratch(request) -> Path:
    """A fresh folder under .tmp/ for one test (pytest's tmp_path would be under /tmp)."""
    path = home.home() / ".tmp" / "tests" / f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def runs_root(scratch, monkeypatch) -> Path:
    root = scratch / "runs"
    monkeypatch.setenv("EVOFORGE_RUNS", str(root))
    return root


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API (with its own database under .tmp/) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from models.tiny import tiny_model_folder

    return tiny_model_folder()


@pytest.fixture(scope="session")
def tiny_engine_config(tiny_model):
    from models.engine import EngineConfig

    return EngineConfig(model=str(tiny_model), backend="vllm", max_model_len=1024)


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines may be dicts (dumped as JSON), str (written as is) or bytes (written raw)."""
    import json

    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            fh.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def pytest_report_header(config):
    return f"EVOFORGE_HOME={home.home()}  TMPDIR={os.environ.get('TMPDIR')}"
