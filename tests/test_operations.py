"""Operating evoforge from Prefect: a real server in the project, `evoforge serve` with a cron
schedule, a stage rerun triggered through the API, its artifacts read back, and the UI in a real
headless browser. One server and one `serve` process for the module (the tiny model keeps it fast).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from waiting import wait_until as _wait

from evoforge.data import home

OUTPUT = home.PROJECT_ROOT / "tests" / "out"  # kept after the run: the UI screenshots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _start_server(root: Path):
    """A Prefect server whose home and SQLite database are under `root`; (process, url, its settings)."""
    from evoforge.app.prefect_server import api_url, start_server

    prefect_home = root / "prefect"
    prefect_home.mkdir(parents=True)
    port = _free_port()
    settings = {"PREFECT_HOME": str(prefect_home),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)  # the server child takes its database from these
    try:
        return start_server(port=port, log_path=root / "server.log"), api_url(port=port), settings
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _round_config(root: Path, tiny_model: Path, problems: int) -> Path:
    """generate -> verify -> filter on the tiny model, 2 samples per problem."""
    config = root / "round.yaml"
    config.write_text(json.dumps({
        "engine": {"model": str(tiny_model), "backend": "vllm", "max_model_len": 1024},
        "sources": [{"path": "data/sets/easy_arithmetic/train.jsonl", "preset": "plain", "name": "easy",
                     "limit": problems}],
        "generate": {"sampling": {"n": 2, "max_tokens": 16, "seed": 0}},
        "stages": ["generate", "verify", "filter"],
    }))
    return config


@pytest.fixture(scope="module")
def served(tiny_model):
    """A Prefect server (database under .tmp/) and `evoforge serve` of run 'sched' every minute."""
    from evoforge.app.prefect_server import stop_server

    root = home.home() / ".tmp" / "tests" / f"operations-{uuid.uuid4().hex[:8]}"
    server, url, settings = _start_server(root)
    env = {**os.environ, **settings, "EVOFORGE_RUNS": str(root / "runs")}
    config = _round_config(root, tiny_model, problems=4)
    serve_log = open(root / "serve.log", "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "evoforge", "serve", "--run", "sched", "--config", str(config), "--cron", "* * * * *"],
        cwd=home.PROJECT_ROOT, env={**env, "PREFECT_API_URL": url}, stdout=serve_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {"url": url, "root": root, "serve": serve}
    finally:
        stop_server(serve)  # the same SIGTERM-then-SIGKILL of the process group as for the server
        serve_log.close()
        stop_server(server)
        shutil.rmtree(root, ignore_errors=True)


def _client(url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = temporary_settings(updates={PREFECT_API_URL: url})
    settings.__enter__()
    return settings, get_client(sync_client=True)


def _final_state(client, flow_run_id, timeout: float):
    def done():
        state = client.read_flow_run(flow_run_id).state
        return state if state is not None and state.is_final() else None

    return _wait(f"flow run {flow_run_id} to finish", done, timeout, every=2.0)


@pytest.fixture(scope="module")
def rerun(served):
    """Once the served deployments exist and the cron schedule has completed a round: a single-stage
    rerun triggered through the API, as the UI's "Custom run" form sends it. Every test of the module
    that needs a finished flow run uses this one, so none depends on another having run first."""
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, DeploymentFilter, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    settings, client = _client(served["url"])
    try:
        with client:
            round_deployment = _wait("the served deployments", lambda: _try(client.read_deployment_by_name, "round/sched"), 180)

            def completed_round():
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                    deployment_filter=DeploymentFilter(id={"any_": [round_deployment.id]}))
                return runs[0] if runs else None

            scheduled = _wait("a scheduled round to complete", completed_round, 240, every=3.0)
            client.pause_deployment(round_deployment.id)  # keep the rest of the module to one flow run at a time
            generate = _wait("the generate deployment", lambda: _try(client.read_deployment_by_name, "generate/sched"), 60)
            triggered = client.create_flow_run_from_deployment(
                generate.id, parameters={"run": "sched", "round": 0, "force": True})
            state = _final_state(client, triggered.id, 240)
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                any_=["sched-generate-counts", "sched-generate-summary", "sched-report"])))
            return {"round_deployment": round_deployment, "scheduled": scheduled, "triggered": triggered,
                    "state": state, "artifacts": artifacts}
    finally:
        settings.__exit__(None, None, None)


@pytest.mark.model
@pytest.mark.server
def test_scheduled_rounds_run_and_a_stage_rerun_through_the_api_publishes_artifacts(served, rerun):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.objects import StateType

    settings, client = _client(served["url"])
    try:
        with client:
            assert rerun["round_deployment"].parameter_openapi_schema["properties"]["config"]  # the UI renders a form from it
            expected = {"round", "generate", "verify", "filter", "synthesize", "mcts", "critic", "pairs", "finetune", "evaluate"}
            flows = {client.read_flow(d.flow_id).name for d in client.read_deployments(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["sched"])))}
            assert flows == expected  # a deployment of the round and of every stage of the registry
    finally:
        settings.__exit__(None, None, None)

    # the cron schedule really creates flow runs, and the served process executes them
    assert rerun["scheduled"].auto_scheduled and rerun["scheduled"].name.startswith("sched/round-")
    assert rerun["state"].type == StateType.COMPLETED, rerun["state"].message
    triggered = rerun["triggered"]
    mine = {a.key: a for a in rerun["artifacts"] if a.flow_run_id == triggered.id}
    assert set(mine) == {"sched-generate-counts", "sched-generate-summary"}
    counts = json.loads(mine["sched-generate-counts"].data) if isinstance(mine["sched-generate-counts"].data, str) \
        else mine["sched-generate-counts"].data
    assert counts[0]["status"] == "completed" and counts[0]["rollouts rows"] == 8  # 4 problems x 2 samples
    assert "rollouts**: 8" in mine["sched-generate-summary"].data
    report = [a for a in rerun["artifacts"] if a.key == "sched-report"]
    assert report and "evoforge run sched after round" in report[0].data and "unsolved" in report[0].data


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(url: str, screenshot: Path, profile: Path) -> str:
    """The page as headless Chromium renders it (the UI builds itself after load: a virtual-time budget)."""
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             "--virtual-time-budget=15000", "--window-size=1400,1000"]
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, timeout=120, check=True, text=True).stdout


@pytest.mark.model
@pytest.mark.server
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (deploy/setup.sh installs it as root)")
def test_the_ui_shows_the_deployment_and_the_completed_run_with_its_artifacts(served, rerun):
    run_id = rerun["triggered"].id
    artifacts = {a.key: a.id for a in rerun["artifacts"] if a.flow_run_id == run_id}
    base = served["url"].removesuffix("/api")
    profile = served["root"] / "chromium-profile"
    deployments = _browse(f"{base}/deployments", OUTPUT / "prefect-ui-deployments.png", profile)
    assert "sched" in deployments and "generate" in deployments and "round" in deployments
    run_page = _browse(f"{base}/runs/flow-run/{run_id}", OUTPUT / "prefect-ui-flow-run.png", profile)
    assert "sched/round-0/generate" in run_page and "Completed" in run_page
    assert "generate (run sched, round 0): 4 in, 8 out, 0 quarantined" in run_page  # the stage's log line
    summary = _browse(f"{base}/artifacts/artifact/{artifacts['sched-generate-summary']}",
                      OUTPUT / "prefect-ui-artifact-summary.png", profile)
    assert "generate, round 0 (completed)" in summary and "finish reasons" in summary
    counts = _browse(f"{base}/artifacts/artifact/{artifacts['sched-generate-counts']}",
                     OUTPUT / "prefect-ui-artifact-counts.png", profile)
    assert "rollouts rows" in counts and "rows quarantined" in counts


@pytest.mark.server
def test_killing_evoforge_ui_stops_its_server_too(scratch):
    """`kill` ends a command like Ctrl-C: the Prefect server `evoforge ui` started in its own session
    goes with it instead of holding its port and database without a parent."""
    import signal
    import threading

    from evoforge.app.prefect_server import api_url, server_healthy

    port = _free_port()
    prefect_home = scratch / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    ui = subprocess.Popen([sys.executable, "-m", "evoforge", "ui", "--port", str(port)], cwd=home.PROJECT_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []
    threading.Thread(target=lambda: printed.extend(ui.stdout), daemon=True).start()
    try:
        # up means the address is printed (a kill before that, while it starts, exits 130 instead)
        _wait("the UI's address", lambda: any("Prefect UI:" in line for line in printed) or ui.poll() is not None, 150)
        assert ui.poll() is None, "".join(printed)
        assert server_healthy(api_url(port=port))
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0, "".join(printed)  # stopping the UI is how it ends
        _wait("the server to stop", lambda: not server_healthy(api_url(port=port), timeout=0.5), 30)
    finally:
        if ui.poll() is None:
            ui.kill()


def _running_children(pid: int, marker: str) -> list[int]:
    """The pids of `pid`'s children (not zombies) whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z" and marker in command:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.server
def test_a_process_killed_outright_takes_prefects_temporary_server_with_it(scratch):
    """With no PREFECT_API_URL a flow runs against a temporary Prefect server, a child process Prefect
    stops at exit. kill -9 runs no exit handler: the server must still go with its process, not run on
    without a parent (it did: ~200 MB each, one per killed stage)."""
    import textwrap

    script = scratch / "flow_then_wait.py"
    script.write_text(textwrap.dedent("""
        import time

        import evoforge.flows  # what every evoforge command that runs a flow imports first
        from prefect import flow


        @flow
        def nothing():
            return 1


        if __name__ == "__main__":
            nothing()
            print("flow done", flush=True)
            time.sleep(600)
    """))
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen([sys.executable, str(script)], cwd=home.PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        printed = []
        for line in process.stdout:
            printed.append(line)
            if line.strip() == "flow done":
                break
        assert process.poll() is None, "".join(printed)
        servers = _running_children(process.pid, "prefect.server.api.server:create_app")
        assert len(servers) == 1, "".join(printed)  # the flow ran against a temporary server of its own
        process.kill()
        process.wait()
        _wait("the temporary server to die with its process", lambda: not any(_running(pid) for pid in servers), 30)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.model
@pytest.mark.server
def test_a_server_that_stops_mid_round_costs_no_work_and_the_round_resumes_without_it(tiny_model):
    """Stop the Prefect server while `generate` runs: the stage keeps its work, the round stops at the
    stage boundary with one line saying how to resume, and the resumed round (no server) redoes nothing."""
    from evoforge.data.lake import Lake
    from evoforge.app.prefect_server import stop_server

    root = home.home() / ".tmp" / "tests" / f"midway-{uuid.uuid4().hex[:8]}"
    server, url, server_env = _start_server(root)
    config = _round_config(root, tiny_model, problems=6)
    runs = root / "runs"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"EVOFORGE_RUNS": str(runs), **server_env})
    store = Lake(runs)

    def generate_running():
        if not (runs / "midway").is_dir():
            return False
        events = store.read("midway", "stage_runs").to_pylist()
        return any(e["stage"] == "generate" and e["status"] == "running" for e in events)

    command = [sys.executable, "-m", "evoforge", "round", "--run", "midway", "--config", str(config)]
    try:
        first = subprocess.Popen(command, cwd=home.PROJECT_ROOT, env={**env, "PREFECT_API_URL": url},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait("generate to start", generate_running, timeout=300, every=0.2)
        stop_server(server)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 2, (out, err)
        # stderr is the terminal's progress (evoforge's lines) and then exactly one error line
        errors = [line for line in err.splitlines() if line.startswith("error:") or "ERROR" in line]
        assert len(errors) == 1 and "Traceback" not in err, err
        for chatter in ("MainProcess", "Loading safetensors", "Warning", "vllm"):  # vLLM's and torch's: log file only
            assert chatter not in err and chatter not in out, (chatter, err)
        line = err.strip().splitlines()[-1]
        assert f"Prefect server at {url} stopped answering" in line and "evoforge round --run midway" in line
        finished = {(e["stage"], e["status"]) for e in store.read("midway", "stage_runs").to_pylist()}
        assert ("generate", "completed") in finished  # the stage that was running kept its work
        assert store.read("midway", "rollouts").num_rows == 12

        resumed = subprocess.run(command, cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        events = store.read("midway", "stage_runs").to_pylist()
        statuses = {e["stage"]: e["status"] for e in sorted(events, key=lambda e: e["finished_at"] or e["started_at"])}
        assert statuses["generate"] == "skipped" and statuses["filter"] == "completed"
    finally:
        stop_server(server)
        shutil.rmtree(root, ignore_errors=True)
