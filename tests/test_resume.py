"""Kill -9 in the middle of generate, run the same command again: the round continues from the
chunks the killed process completed, nothing is generated twice, no row is lost or duplicated, and
`stage_runs` shows the interrupted attempt. With the lake on a local disk and on an S3 server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from evoforge.data import home
from evoforge.data.chunks import read_chunk
from evoforge.data.lake import Lake
from evoforge.data.storage import location


@pytest.mark.model
@pytest.mark.server
@pytest.mark.parametrize("lake_on", ["disk", "s3"])
def test_a_round_killed_mid_generate_resumes_without_redoing_or_losing_rows(write_jsonl, tiny_model, scratch, lake_on,
                                                                            request):
    problems = 12
    source = write_jsonl(scratch / "pool.jsonl", [
        {"question": f"Tom has {i} marbles and finds {i + 3} more. How many marbles does he have?", "answer": str(2 * i + 3)}
        for i in range(problems)
    ])
    config = scratch / "round.yaml"
    config.write_text(json.dumps({
        "engine": {"model": str(tiny_model), "backend": "vllm", "max_model_len": 1024},
        "sources": [{"path": str(source), "preset": "plain", "name": "marbles"}],
        # one problem per engine call: twelve chunks, so the kill lands between two of them
        "generate": {"sampling": {"n": 4, "max_tokens": 96, "seed": 3}, "batch_problems": 1},
        "stages": ["generate", "verify", "filter"],
    }))
    env = dict(os.environ)
    if lake_on == "s3":
        s3 = request.getfixturevalue("local_s3")
        env.update(s3.environment(), EVOFORGE_RUNS=f"s3://{s3.create_bucket(f'resume-{os.getpid()}-{time.time_ns()}')}/runs")
        for key, value in s3.environment().items():  # this process reads the lake too
            request.getfixturevalue("monkeypatch").setenv(key, value)
    else:
        env["EVOFORGE_RUNS"] = str(scratch / "runs")
    runs = location(env["EVOFORGE_RUNS"])
    command = [sys.executable, "-m", "evoforge", "round", "--run", "crash", "--config", str(config), "--round", "0"]
    chunk_dir = runs / "crash" / "_chunks" / "round=0" / "generate"

    output = scratch / "first.log"
    with open(output, "wb") as log:
        first = subprocess.Popen(command, cwd=home.PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(chunk_dir.glob("*/*.arrow"))) < 3:
        assert first.poll() is None, f"the round ended before it could be killed:\n{output.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no generate chunks appeared"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    done_before = {p.name: read_chunk(p) for p in chunk_dir.glob("*/*.arrow")}
    assert 3 <= len(done_before) < problems
    assert not (runs / "crash" / "round=0" / "generate").exists()  # nothing half-published

    second = subprocess.run(command, cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"{len(done_before)} chunk(s) reused from an interrupted attempt, {problems - len(done_before)} computed" in log
    assert "was interrupted" in log

    lake = Lake(runs)
    rollouts = lake.read("crash", "rollouts", 0, "generate")
    ids = rollouts["rollout_id"].to_pylist()
    assert len(ids) == problems * 4 and len(set(ids)) == len(ids)
    # the chunks the killed process finished are in the output as they were: not generated again
    published = dict(zip(ids, rollouts["text"].to_pylist()))
    for chunk in done_before.values():
        for rollout_id, text in zip(chunk["rollout_id"].to_pylist(), chunk["text"].to_pylist()):
            assert published[rollout_id] == text
    verdicts = lake.read("crash", "verdicts", 0, "verify")
    assert sorted(verdicts["rollout_id"].to_pylist()) == sorted(ids)
    assert not chunk_dir.exists()  # spent once published

    events = lake.read("crash", "stage_runs").to_pylist()
    attempts: dict[str, set[str]] = {}
    for e in events:
        if e["stage"] == "generate":
            attempts.setdefault(e["stage_run_id"], set()).add(e["status"])
    assert sorted(map(sorted, attempts.values())) == [["completed", "running"], ["interrupted", "running"]]
