"""Stages on the machines that fit them (flows/dispatch.py, deploy/prefect.yaml, deploy/cluster/).

The server test runs the documented setup on this machine: one Prefect server on the project's
PostgreSQL (app/postgres.py), the lake on the local S3 server, deploy/cluster/setup.sh, and two
workers started by deploy/cluster/worker.sh, each with an EVOFORGE_HOME of its own and no disk in
common with the other ("a GPU machine" and "a CPU machine"), and the round of deploy/cluster/round.yaml
run by `evoforge round` from a third home. Then the CPU machine dies in the middle of verify.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from exposure import in_files, on_command_lines, post_status
from waiting import wait_until as _wait

from evoforge.data import atomic, home

CLUSTER = home.PROJECT_ROOT / "deploy" / "cluster"
GPU_STAGES = {"generate", "synthesize", "mcts", "critic", "finetune", "evaluate"}
CPU_STAGES = {"ingest", "verify", "filter", "pairs"}


# -- the files agree -------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_pools_of_the_cluster_config_are_the_deployments_of_prefect_yaml():
    from evoforge.flows.config import load_config
    from evoforge.flows.dispatch import POOLS, deployment_name
    from evoforge.flows.stages import STAGES

    spec = yaml.safe_load((home.PROJECT_ROOT / "deploy" / "prefect.yaml").read_text())
    deployments = {(d["entrypoint"].rsplit(":", 1)[1], d["name"]): d for d in spec["deployments"]}
    flow_names = {"round_flow": "round", "stage_flow": "stage"}
    named = {f"{flow_names[fn]}/{name}": d["work_pool"]["name"] for (fn, name), d in deployments.items()}
    # the existing ones: the scheduled round and the single-stage rerun, on a machine that can run any stage
    assert named["round/demo"] == "gpu" and named["stage/demo"] == "gpu"
    assert deployments[("round_flow", "demo")]["schedules"][0]["cron"]
    # one stage deployment per machine class, named as the round dispatches to it
    for pool in POOLS:
        assert named[deployment_name(pool)] == pool
        assert set(deployments[("stage_flow", pool)]["parameters"]) == {"stage", "run", "round", "force"}
    # the cluster round runs in the cpu pool: it only waits for its stages
    assert named["round/cluster"] == "cpu"
    config_file = deployments[("round_flow", "cluster")]["parameters"]["config_file"]
    config = load_config(home.PROJECT_ROOT / config_file)
    assert config_file == "deploy/cluster/round.yaml"
    assert set(config.cluster.pools) == set(STAGES)  # every stage of the registry has its machine class
    assert {s for s, p in config.cluster.pools.items() if p == "gpu"} == GPU_STAGES
    assert {s for s, p in config.cluster.pools.items() if p == "cpu"} == CPU_STAGES
    for script in ("setup.sh", "worker.sh"):
        assert os.access(CLUSTER / script, os.X_OK)


@pytest.mark.unit
def test_the_cluster_section_is_empty_by_default_and_checked():
    from pydantic import ValidationError

    from evoforge.flows.config import RoundConfig

    assert RoundConfig().cluster.pools == {}  # every stage in the round's own process, as before
    for wrong in ({"pools": {"train": "gpu"}}, {"pools": {"generate": "g p u"}},
                  {"heartbeat_seconds": 30, "lost_after_seconds": 35}, {"heartbeat_seconds": 10}):
        with pytest.raises(ValidationError):
            RoundConfig.model_validate({"cluster": wrong})


# -- the round's locks ------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_round_dispatching_its_stages_leaves_the_run_lock_free_and_keeps_other_rounds_out(runs_root, monkeypatch):
    """While a stage runs in a pool the run's lock is free (the stage takes it on its machine) and the
    config is already in the lake; a second round of the same run is refused all along."""
    from evoforge.data.lake import lake
    from evoforge.data.runlock import RunBusy, run_lock
    from evoforge.flows import round as round_module
    from evoforge.flows.config import RoundConfig
    from evoforge.flows.dispatch import orchestrating
    from evoforge.flows.inputs import saved_config

    config = RoundConfig.model_validate({"stages": ["generate"], "cluster": {"pools": {"ingest": "cpu", "generate": "gpu"}}})
    seen = []

    def in_another_thread(fn):
        box = {}

        def target():
            try:
                box["value"] = fn()
            except Exception as err:
                box["error"] = err
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        return box

    def take_run_lock(run="split"):
        with run_lock(lake().run_dir(run), "round 0 / stage on another machine"):
            return "taken"

    def another_round():
        with orchestrating("split", "round 0"):
            return "taken"

    def fake_dispatch(name, run, round, force, pool, cluster):
        assert saved_config(run) == config  # the stage's machine reads the config from the lake
        seen.append((name, pool, in_another_thread(take_run_lock).get("value"),
                     str(in_another_thread(another_round).get("error"))))
        return []

    monkeypatch.setattr(round_module, "dispatch_stage", fake_dispatch)
    assert round_module.round_flow.fn("split", config, round=0) == []
    assert [(name, pool, lock) for name, pool, lock, _ in seen] == [("ingest", "cpu", "taken"), ("generate", "gpu", "taken")]
    for *_, refused in seen:
        assert refused.startswith("run 'split' is busy: another round orchestrates it: ")
    assert in_another_thread(another_round).get("value") == "taken"  # released with the round

    # without pools the round holds the run's lock throughout, as on one machine
    local = []

    def fake_run_stage(name, run, round, config, force):
        local.append((name, type(in_another_thread(lambda: take_run_lock("alone")).get("error")).__name__))
        return []

    monkeypatch.setattr(round_module, "run_stage", fake_run_stage)
    round_module.round_flow.fn("alone", RoundConfig.model_validate({"stages": ["generate"]}), round=0)
    assert local == [("ingest", "RunBusy"), ("generate", "RunBusy")]


# -- waiting for a dispatched stage ---------------------------------------------------------------
class _Clock:
    """time for flows/dispatch.py: sleeping advances it, nothing waits."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _FakeServer:
    """The part of Prefect's client dispatch_stage uses. Each submitted flow run follows a script: a
    list of (state, heartbeat id) per poll; its last entry repeats."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.runs, self.forced = {}, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment_by_name(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(id=name)

    def submit(self, deployment, name, parameters, run, heartbeat_seconds):
        import uuid as uuid_module
        from types import SimpleNamespace

        flow_run = SimpleNamespace(id=uuid_module.uuid4(), name=name, labels={"prefect.worker.name": "w"},
                                   created=None, state=None, polls=0, script=self.scripts.pop(0))
        self.runs[flow_run.id] = flow_run
        return flow_run

    def read_flow_run(self, flow_run_id):
        flow_run = self.runs[flow_run_id]
        if not (flow_run.state is not None and flow_run.state.is_final()):  # a forced state sticks
            flow_run.state, flow_run.heartbeat = flow_run.script[min(flow_run.polls, len(flow_run.script) - 1)]
            flow_run.polls += 1
        return flow_run

    def set_flow_run_state(self, flow_run_id, state, force=False):
        self.forced.append((flow_run_id, state.type.value, state.message))
        self.runs[flow_run_id].state = state


@pytest.fixture()
def fake_prefect(monkeypatch):
    from evoforge.flows import dispatch

    def install(*scripts):
        server = _FakeServer(scripts)
        monkeypatch.setattr(dispatch, "time", _Clock())
        monkeypatch.setattr(dispatch, "_client", lambda: server)
        monkeypatch.setattr(dispatch, "_submit", server.submit)
        monkeypatch.setattr(dispatch, "_find_open_run", lambda *args: None)
        monkeypatch.setattr(dispatch, "_newest_heartbeat", lambda client, flow_run: flow_run.heartbeat)
        monkeypatch.setattr(dispatch, "_await_run_free", lambda *args: server.forced.append("run free"))
        monkeypatch.setattr(dispatch, "_results", lambda client, run, round, stage, flow_run_id: [(stage, flow_run_id)])
        return server

    return install


@pytest.mark.unit
def test_a_stage_run_that_keeps_its_heartbeat_is_waited_for_however_long_it_takes(fake_prefect):
    from prefect.states import Completed, Pending, Running, Scheduled

    from evoforge.flows.config import ClusterConfig
    from evoforge.flows.dispatch import dispatch_stage

    beating = [(Running(), f"beat-{i // 20}") for i in range(200)]  # a new heartbeat every 20 polls (40 s)
    server = fake_prefect([(Scheduled(), None)] * 50 + [(Pending(), None)] * 10 + beating + [(Completed(), None)])
    results = dispatch_stage("generate", "r", 0, False, "gpu", ClusterConfig(lost_after_seconds=60, poll_seconds=2))
    assert [stage for stage, _ in results] == ["generate"] and server.forced == []


@pytest.mark.unit
def test_a_silent_stage_run_is_marked_crashed_and_submitted_again_once_the_run_is_free(fake_prefect):
    from prefect.states import Completed, Running

    from evoforge.flows.config import ClusterConfig
    from evoforge.flows.dispatch import dispatch_stage

    server = fake_prefect([(Running(), "beat-1")], [(Running(), "beat-2"), (Completed(), None)])
    results = dispatch_stage("verify", "r", 0, False, "cpu", ClusterConfig(lost_after_seconds=60, poll_seconds=2))
    first, second = server.runs
    assert results == [("verify", second)]
    assert server.forced == [(first, "CRASHED", "evoforge: no heartbeat for 60 s: the worker or machine running it "
                                                "was lost (the round submits the stage again)"), "run free"]


@pytest.mark.unit
def test_a_failed_or_repeatedly_lost_stage_run_stops_the_round_with_one_line(fake_prefect):
    from prefect.states import Crashed, Failed

    from evoforge.flows.config import ClusterConfig
    from evoforge.flows.dispatch import StageRunFailed, dispatch_stage

    fake_prefect([(Failed(message="Flow run encountered an exception: MissingInput: no rollouts"), None)])
    with pytest.raises(StageRunFailed) as failed:
        dispatch_stage("verify", "r", 0, False, "cpu", ClusterConfig())
    assert str(failed.value).startswith("verify (run r, round 0) did not complete in work pool 'cpu': flow run "
                                        "'r/round-0/verify' (")
    assert "ended Failed: Flow run encountered an exception: MissingInput: no rollouts" in str(failed.value)
    assert "\n" not in str(failed.value)

    server = fake_prefect(*[[(Crashed(message="Flow run infrastructure exited with non-zero status code -9."), None)]] * 3)
    with pytest.raises(StageRunFailed, match=r"did not complete in work pool 'gpu' after 3 attempts: .* ended Crashed: "
                                             r"Flow run infrastructure exited"):
        dispatch_stage("generate", "r", 0, False, "gpu", ClusterConfig(retries=2))
    assert server.forced == ["run free", "run free"]


# -- two machines -----------------------------------------------------------------------------------
SLOW_VERIFY = '''
# Fault injection for tests/test_cluster.py, on the "CPU machine" only: verify stores its verdicts in
# chunks of {chunk} rollouts and takes {delay} s per chunk, so the machine can be killed in the middle.
import importlib.abc, importlib.util, sys, time

class _SlowVerify(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "evoforge.tasks.verify":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            grade = module._grade_batch
            module.CHUNK_ROLLOUTS = {chunk}

            def slow(*args, **kwargs):
                time.sleep({delay})
                return grade(*args, **kwargs)
            module._grade_batch = slow
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _SlowVerify())
'''




def _wait_for_none(find, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return f"--- {path.name}: none"


class Machines:
    """The processes the test starts (servers, workers, the round), each in a session of its own, all
    stopped at the end whatever happened."""

    def __init__(self, scratch: Path):
        # the machines' homes under a short path: a home's TMPDIR holds unix sockets (multiprocessing's
        # forkserver, PostgreSQL), whose paths may not exceed 107 bytes
        self.homes = home.home() / ".tmp" / f"cl-{uuid.uuid4().hex[:8]}"
        self.homes.mkdir(parents=True)
        self.logs = scratch / "logs"
        self.logs.mkdir()
        self.processes: list[subprocess.Popen] = []

    def environment(self, name: str, **extra: str) -> dict[str, str]:
        """A machine's environment: its own EVOFORGE_HOME, none of this session's home settings; the
        server, the lake and the S3 credentials are what the machines share."""
        root = self.homes / name
        root.mkdir(exist_ok=True)
        session = home.environment_defaults(home.home())
        env = {k: v for k, v in os.environ.items() if k not in session and k != "PREFECT_HOME"}
        env.update(EVOFORGE_HOME=str(root), **extra)
        return env

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, cwd=home.PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            self.kill(process)

    def remove_homes(self) -> None:
        shutil.rmtree(self.homes, ignore_errors=True)

    def survivors(self) -> list[str]:
        """Live processes (zombies aside) whose command line or environment names a machine's home."""
        mark, found = str(self.homes).encode(), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
                cmdline = (entry / "cmdline").read_bytes()
                if mark in cmdline or mark in (entry / "environ").read_bytes():
                    command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
                    found.append(f"{entry.name}: {command}")
            except (OSError, IndexError):
                continue
        return found

    def explain(self) -> str:
        return "\n".join(_tail(path) for path in sorted(self.logs.glob("*.log")))


def _secrets_in_objects(root: str, secret_values: dict[str, str]) -> list[str]:
    """The secrets found in the lake's objects (every run, table, manifest, log and config under `root`)."""
    from evoforge.data.storage import location

    objects = [path for path in location(root).rglob("*") if path.is_file()]
    assert objects, f"no object under {root}"
    return in_files(objects, secret_values)


def _cluster_config(scratch: Path, tiny_model: Path) -> Path:
    """deploy/cluster/round.yaml as it is, but for the tiny model, short completions and a quicker
    verdict on a lost machine."""
    config = yaml.safe_load((CLUSTER / "round.yaml").read_text())
    config["engine"].update(model=str(tiny_model), max_model_len=1024)
    config["generate"]["sampling"].update(n=4, max_tokens=16)
    config["cluster"].update(lost_after_seconds=45, poll_seconds=1)
    path = scratch / "round.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.model
@pytest.mark.server
def test_a_round_split_over_a_gpu_and_a_cpu_machine_survives_losing_the_cpu_machine(
        s3_runs, tiny_model, scratch, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from evoforge.data.lake import lake
    from evoforge.data.local_s3 import free_port
    from evoforge.data.storage import location
    from evoforge.flows.dispatch import where_it_ran
    from evoforge.app.postgres import PostgresServer
    from evoforge.app.prefect_server import api_url, start_server, stop_server

    import secrets

    started = time.monotonic()
    timings: dict[str, float] = {}
    machines = Machines(scratch)
    postgres = PostgresServer(home=machines.homes / "server", port=free_port())
    # the secrets of a real cluster, distinct enough to be searched for afterwards (moto takes any S3 secret)
    auth = f"evoforge:{secrets.token_urlsafe(24)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"s3-{secrets.token_urlsafe(24)}")
    server = None
    # the server's record goes to the test's Prefect home, not the project's (.prefect/server.json)
    (machines.homes / "server" / ".prefect").mkdir(parents=True)
    monkeypatch.setenv("PREFECT_HOME", str(machines.homes / "server" / ".prefect"))
    try:
        postgres.start()
        port = free_port()
        server = start_server(port=port, log_path=machines.logs / "prefect-server.log", database_url=postgres.url(),
                              auth_string=auth)
        url = api_url(port=port)
        timings["server"] = time.monotonic() - started
        assert post_status(url + "/deployments/") == 401  # what a stranger on the network gets
        shared = {"PREFECT_API_URL": url, "EVOFORGE_LOCK_TTL_SECONDS": "10", "PREFECT_WORKER_QUERY_SECONDS": "2"}
        # the two ways README gives the other machines the auth string: the environment, or the file
        control = machines.environment("control", **shared, PREFECT_API_AUTH_STRING=auth)
        gpu = machines.environment("gpu", **shared)
        (machines.homes / "gpu" / ".prefect").mkdir(parents=True)
        atomic.write_text(machines.homes / "gpu" / ".prefect" / home.AUTH_FILE, auth + "\n", mode=0o600)
        slow = scratch / "cpu-site"
        slow.mkdir()
        (slow / "sitecustomize.py").write_text(SLOW_VERIFY.format(chunk=8, delay=1.5))
        cpu = machines.environment("cpu", **shared, PREFECT_API_AUTH_STRING=auth, PYTHONPATH=str(slow))
        secret_values = {"the Prefect auth string": auth, "the S3 secret": os.environ["AWS_SECRET_ACCESS_KEY"],
                         "the database password": postgres.password()}

        # the documented setup: pools and the stage deployments (not the scheduled demo round), one worker per machine
        setup = subprocess.run([str(CLUSTER / "setup.sh"), "--name", "stage_flow/gpu", "--name", "stage_flow/cpu"],
                               cwd=home.PROJECT_ROOT, env=control, capture_output=True, text=True, timeout=180)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        worker = [str(CLUSTER / "worker.sh")]
        machines.start("gpu-worker", [*worker, "gpu", "--name", "gpu-machine"], gpu)
        cpu_worker = machines.start("cpu-worker", [*worker, "cpu", "--name", "cpu-machine"], cpu)
        timings["setup"] = time.monotonic() - started

        command = [sys.executable, "-m", "evoforge", "round", "--run", "cl", "--config",
                   str(_cluster_config(scratch, tiny_model)), "--round", "0"]
        the_round = machines.start("round", command, control)
        chunks = location(s3_runs) / "cl" / "_chunks" / "round=0" / "verify"

        def verify_midway():
            assert the_round.poll() is None, f"the round ended before verify could be interrupted\n{machines.explain()}"
            return len(list(chunks.glob("*/*.arrow"))) >= 3

        _wait("verify to store 3 chunks", verify_midway, 300, every=0.3, explain=machines.explain)
        timings["verify midway"] = time.monotonic() - started
        assert on_command_lines(secret_values) == []  # every machine's processes are up now
        machines.kill(cpu_worker)  # the CPU machine dies: its worker, the verify run, its graders
        time.sleep(1)  # a chunk whose upload was under way when it died lands now, or never
        done_before = {p.name for p in chunks.glob("*/*.arrow")}
        machines.start("cpu-worker-again", [*worker, "cpu", "--name", "cpu-machine"], cpu)

        assert the_round.wait(timeout=400) == 0, machines.explain()
        timings["round"] = time.monotonic() - started
        round_log = (machines.logs / "round.log").read_text()
        assert "crashed" in round_log and "submitting the stage again" in round_log, round_log[-3000:]

        # no verdict lost or duplicated; the second attempt reused what the dead machine had stored
        store = lake()
        rollout_ids = store.read("cl", "rollouts")["rollout_id"].to_pylist()
        verdict_ids = store.read("cl", "verdicts")["rollout_id"].to_pylist()
        assert len(rollout_ids) == 24 * 4 and len(set(rollout_ids)) == len(rollout_ids)
        assert sorted(verdict_ids) == sorted(rollout_ids)
        resumed = re.findall(r"verify \(run cl, round 0\): (\d+) chunk\(s\) reused from an interrupted attempt, (\d+) "
                             r"computed", (machines.logs / "cpu-worker-again.log").read_text())
        assert resumed and int(resumed[0][0]) == len(done_before) and int(resumed[0][1]) > 0, \
            f"{resumed} after {len(done_before)} chunks\n{machines.explain()}"
        events = store.read("cl", "stage_runs").to_pylist()
        attempts: dict[str, set[str]] = {}
        for e in events:
            if e["stage"] == "verify":
                attempts.setdefault(e["stage_run_id"], set()).add(e["status"])
        assert sorted(map(sorted, attempts.values())) == [["completed", "running"], ["interrupted", "running"]]

        # each stage ran in its machine's pool: asked of Prefect through the flow run each event names
        finished = [e for e in events if e["status"] == "completed"]
        assert sorted(e["stage"] for e in finished) == ["filter", "generate", "ingest", "verify"]
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}), \
                get_client(sync_client=True) as client:
            ran = {e["stage"]: where_it_ran(client, e["flow_run_id"]) for e in finished}
            lost = [r for r in client.read_flow_runs() if r.name == "cl/round-0/verify" and r.state.is_crashed()]
        assert {stage: (r["work_pool"], r["worker"]) for stage, r in ran.items()} == {
            "ingest": ("cpu", "cpu-machine"), "generate": ("gpu", "gpu-machine"),
            "verify": ("cpu", "cpu-machine"), "filter": ("cpu", "cpu-machine")}
        assert len(lost) == 1 and "no heartbeat" in lost[0].state.message

        # either machine's evoforge sees the same catalog
        query = "SELECT stage, status, count(*) AS n FROM stage_runs GROUP BY ALL ORDER BY ALL"
        seen = {}
        for name, env in (("gpu", gpu), ("cpu", cpu)):
            done = subprocess.run([sys.executable, "-m", "evoforge", "sql", "--run", "cl", query, "--csv"],
                                  cwd=home.PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            seen[name] = done.stdout
        assert seen["gpu"] == seen["cpu"] and "verify,interrupted,1" in seen["gpu"]

        # no secret in any file the round wrote (the machines' homes, their logs, the lake), but the two files
        # that are there to hold one (mode 0600)
        stores = {machines.homes / "server" / ".postgres" / "password", machines.homes / "gpu" / ".prefect" / home.AUTH_FILE}
        assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in stores)
        files = [p for root in (machines.homes, machines.logs) for p in root.rglob("*") if p.is_file() and p not in stores]
        assert len(files) > 50 and in_files(files, secret_values) == []
        assert _secrets_in_objects(s3_runs, secret_values) == []
        timings["total"] = time.monotonic() - started
        print("timings (s from the start): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    finally:
        machines.stop_all()
        if server is not None:
            stop_server(server)
        postgres.stop()
        left = _wait_for_none(machines.survivors)
        machines.remove_homes()
    assert not left, f"processes the test started outlived it: {left}"
