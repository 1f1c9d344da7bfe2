"""Generation on `vllm serve` replicas (models/openai_engine.py, models/vllm_servers.py): two real
replicas of the tiny model on this machine's two cores, against the in-process engine."""
from __future__ import annotations

import stat
import threading
import time

import pyarrow as pa
import pytest

from evoforge.models.engine import EngineConfig, GenerationRequest, LaunchConfig, SamplingConfig
from evoforge.models.loader import load_engine
from evoforge.models.prompts import solve_messages
from evoforge.models.vllm_servers import ipc_dir

PORT = 8170  # the fleet takes the first free ports from here


@pytest.fixture(scope="module")
def served(tiny_model):
    """An engine over two launched replicas; stopped at the end of the module."""
    from evoforge.models.openai_engine import OpenAIEngine
    from evoforge.models.registry import resolve

    config = EngineConfig(model=str(tiny_model), backend="openai", max_model_len=1024,
                          launch=LaunchConfig(replicas=2, port=PORT), unavailable_timeout_s=60)
    engine = OpenAIEngine(resolve(config.model), config)
    ports = [replica.port for replica in engine.fleet.running]
    yield engine
    engine.sleep()
    assert all(not r.alive for r in engine.fleet.running) and not engine.fleet.running
    assert not any(ipc_dir(port).exists() for port in ports)  # nor their IPC sockets


def _requests(count: int) -> list[GenerationRequest]:
    return [GenerationRequest(solve_messages(f"What is {i} + {2 * i}?"), seed=100 + i) for i in range(count)]


@pytest.mark.model
def test_served_completions_equal_the_in_process_engines(served, tiny_engine_config):
    local = load_engine(tiny_engine_config)
    assert served.model_id == local.model_id  # the id names the same weights
    requests = _requests(6)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=48)
    assert [[c.text for c in s] for s in served.generate(requests, greedy)] == \
        [[c.text for c in s] for s in local.generate(requests, greedy)]
    # seeded sampling too: a request's seed and n mean the same samples on a server (vLLM seeds sample i with seed + i)
    sampled = SamplingConfig(n=3, temperature=0.8, top_p=0.95, max_tokens=48, stop=["\n\n"])
    remote, here = served.generate(requests, sampled), local.generate(requests, sampled)
    for r, h in zip(remote, here):
        assert [(c.text, c.token_count, c.finish_reason) for c in r] == [(c.text, c.token_count, c.finish_reason) for c in h]
        assert [c.mean_logprob for c in r] == pytest.approx([c.mean_logprob for c in h], abs=1e-3)
    assert all(count > 0 for count in served.requests_per_endpoint.values())  # both replicas served
    # each replica's API server and engine core talk through sockets in its own folder, not the project's .tmp
    assert all(any(stat.S_ISSOCK(p.lstat().st_mode) for p in ipc_dir(r.port).iterdir()) for r in served.fleet.running)


@pytest.mark.model
def test_a_generate_stage_survives_a_replica_killed_in_the_middle(served, tiny_engine_config):
    from evoforge.data import schemas
    from evoforge.tasks.generate import GenerateConfig, generate

    problems = pa.Table.from_pylist(
        [dict(problem_id=f"p{i:02d}", question=f"Tom has {i} apples and buys {i + 3} more. How many now?")
         for i in range(24)])
    config = GenerateConfig(sampling=SamplingConfig(n=4, temperature=0.8, max_tokens=96, seed=5), batch_problems=8)
    before = dict(served.requests_per_endpoint)
    victim = served.fleet.running[0]
    victim_url = served.fleet.endpoints[0]

    def kill_after_some_requests():
        deadline = time.monotonic() + 300
        while served.requests_per_endpoint[victim_url] < before[victim_url] + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        served.fleet.kill_replica(0)  # SIGKILL, requests in flight on it die with it

    killer = threading.Thread(target=kill_after_some_requests)
    killer.start()
    rollouts = generate(problems, served, config)
    killer.join()
    assert not victim.alive
    expected = generate(problems, load_engine(tiny_engine_config), config)
    # no rollout lost or duplicated: the same rows as the in-process engine's, each once
    assert rollouts.num_rows == 24 * 4 == len(set(rollouts["rollout_id"].to_pylist()))
    assert sorted(rollouts["rollout_id"].to_pylist()) == sorted(expected["rollout_id"].to_pylist())
    assert rollouts.schema.equals(schemas.ROLLOUTS)
    assert set(rollouts["model_id"].to_pylist()) == {served.model_id}
    after = served.requests_per_endpoint
    assert after[served.fleet.endpoints[1]] > before[served.fleet.endpoints[1]]  # the survivor took the rest

    # the replica comes back on its port: the engine probes it and routes to it again
    served.fleet.restart_replica(0)
    settled = time.monotonic() + 60
    while served.requests_per_endpoint[victim_url] == after[victim_url] and time.monotonic() < settled:
        served.generate(_requests(8), SamplingConfig(n=2, max_tokens=16))
    assert served.requests_per_endpoint[victim_url] > after[victim_url]


@pytest.mark.model
def test_an_endpoint_serving_other_weights_is_refused_in_one_line(served):
    from evoforge.models.openai_engine import OpenAIEngine, WrongServedModel
    from evoforge.models.registry import resolve

    other = EngineConfig(model="default", backend="openai", endpoints=served.fleet.endpoints)
    with pytest.raises(WrongServedModel, match=r"serves tiny-llama-0@\w+, not SmolLM2-135M-Instruct@\w+ .*restart it"):
        OpenAIEngine(resolve("default"), other)


@pytest.mark.model
def test_a_request_the_server_refuses_is_not_retried(served):
    from evoforge.models.engine import EngineRequestError

    long_question = "word " * 2000  # past max_model_len: a 400 from the server, the same on every replica
    before = sum(served.requests_per_endpoint.values())
    with pytest.raises(EngineRequestError, match="tiny-llama-0"):
        served.generate([GenerationRequest(solve_messages(long_question), seed=1)], SamplingConfig(n=1, max_tokens=8))
    assert all(e.up for e in served.router.endpoints)  # not counted against the replicas
    assert sum(served.requests_per_endpoint.values()) == before + 1  # answered once, not tried on the other


@pytest.mark.model
def test_mcts_and_the_critic_search_and_judge_the_same_through_the_servers(served, tiny_engine_config):
    """MCTS continues a reply (assistant prefix) and the critic judges pairs: on the servers both give
    what the in-process engine gives."""
    from evoforge.tasks.critic import CriticConfig, judge
    from evoforge.tasks.mcts import MCTSConfig, search
    from evoforge.tasks.verify import VerifyConfig

    local = load_engine(tiny_engine_config)
    problems = pa.table({"problem_id": ["a", "b"], "question": ["What is 2 + 3?", "What is 4 * 5?"], "answer": ["5", "20"]})
    config = MCTSConfig(rollouts=2, max_depth=2, children=2)
    config.step.max_tokens = 24
    nodes = {}
    for name, engine in (("served", served), ("local", local)):
        nodes[name] = search(problems, engine, config, VerifyConfig(workers=1))["mcts_nodes"].sort_by("node_id")
    assert nodes["served"].num_rows > 2
    assert nodes["served"].select(["node_id", "step_text", "exec_output", "q_value", "visits"]).equals(
        nodes["local"].select(["node_id", "step_text", "exec_output", "q_value", "visits"]))

    judged = pa.table({"problem_id": ["a", "b"], "question": ["What is 2 + 3?", "What is 4 * 5?"],
                       "expert_answer": ["2 + 3 = 5. \\boxed{5}", "4 * 5 = 20. \\boxed{20}"]})
    answers = pa.table({"rollout_id": ["r1", "r2"], "problem_id": ["a", "b"], "text": ["\\boxed{5}", "\\boxed{21}"]})
    critic = CriticConfig(sampling=SamplingConfig(n=1, temperature=0.7, max_tokens=24, seed=3))
    served_judgments = judge(judged, answers, served, critic).sort_by("rollout_id")
    local_judgments = judge(judged, answers, local, critic).sort_by("rollout_id")
    assert served_judgments.num_rows == 2
    assert served_judgments.equals(local_judgments)


@pytest.mark.model
def test_engine_serve_prints_its_endpoints_and_stops_its_replicas_on_kill(tiny_model, scratch):
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from evoforge.data import home
    from evoforge.models import vllm_servers

    out = open(scratch / "serve.out", "w+")
    serve = subprocess.Popen([sys.executable, "-m", "evoforge", "engine", "serve", "--model", str(tiny_model),
                              "--port", "8210", "--max-model-len", "1024"], cwd=home.PROJECT_ROOT, stdout=out,
                             stderr=subprocess.STDOUT, env={**os.environ, "EVOFORGE_TRACEBACK": "1"})
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops them" not in (scratch / "serve.out").read_text() and time.monotonic() < deadline:
            assert serve.poll() is None, (scratch / "serve.out").read_text()
            time.sleep(0.5)
        printed = (scratch / "serve.out").read_text()
        endpoint = next(word for word in printed.split() if word.startswith("http://") and word.endswith("/v1"))
        with urllib.request.urlopen(f"{endpoint}/models", timeout=10) as response:
            served = [m["id"] for m in json.load(response)["data"]]
        assert served == [resolve_id(tiny_model)]  # served under evoforge's model id
        assert "backend: openai" in printed and f"endpoints: [{endpoint}]" in printed
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    assert code == 0 and "stopped 1 replica(s)" in (scratch / "serve.out").read_text()
    port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
    assert vllm_servers._port_free("127.0.0.1", port)


def resolve_id(folder) -> str:
    from evoforge.models.registry import resolve

    return resolve(str(folder)).model_id


@pytest.mark.unit
def test_an_openai_engine_config_names_the_variable_holding_its_key_never_the_key(monkeypatch):
    with pytest.raises(ValueError, match="the name of an environment variable"):
        EngineConfig(backend="openai", endpoints=["http://h:1/v1"], api_key_env="sk-0123456789abcdefghijklmnop")
    with pytest.raises(ValueError, match="give the key through engine.api_key_env"):
        EngineConfig(backend="openai", endpoints=["http://user:s3cret@h:1/v1"])
    config = EngineConfig(backend="openai", endpoints=["http://h:1/v1"], api_key_env="EVOFORGE_TEST_KEY")
    monkeypatch.delenv("EVOFORGE_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="names EVOFORGE_TEST_KEY, which is not set"):
        config.api_key()
    monkeypatch.setenv("EVOFORGE_TEST_KEY", "k")
    assert config.api_key() == "k" and "api_key" not in config.output_settings()


@pytest.mark.unit
def test_engine_serve_refuses_to_serve_other_machines_without_a_key(scratch):
    import os
    import subprocess
    import sys

    from evoforge.data import home

    done = subprocess.run([sys.executable, "-m", "evoforge", "engine", "serve", "--model", "default", "--host",
                           "0.0.0.0", "--port", "8231"], cwd=home.PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "VLLM_API_KEY": ""})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "would answer anyone" in done.stderr


@pytest.mark.model
def test_replicas_others_can_reach_answer_only_with_their_key_on_every_path(tiny_model, scratch, monkeypatch):
    """`engine serve --host 0.0.0.0` makes a key (0600, by environment to the replicas, on no command line); every
    path refuses a request without it (vLLM itself guards /v1 only); an openai engine naming the variable that
    holds it generates; a wrong key is one line at once, not a retry storm."""
    import os
    import signal
    import stat
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from evoforge.data import home
    from evoforge.models.openai_engine import KeyRefused, OpenAIEngine
    from exposure import on_command_lines
    from evoforge.models.registry import resolve

    import shutil
    import uuid

    root = home.home() / ".tmp" / f"key-{uuid.uuid4().hex[:8]}"  # short: its .tmp holds vLLM's unix sockets (107 bytes)
    env = {k: v for k, v in os.environ.items() if k not in home.environment_defaults(home.home()) and k != "VLLM_API_KEY"}
    env.update(EVOFORGE_HOME=str(root), EVOFORGE_TRACEBACK="1")
    out_path = scratch / "serve.out"
    with open(out_path, "w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "evoforge", "engine", "serve", "--model", str(tiny_model),
                                  "--host", "0.0.0.0", "--port", "8240", "--max-model-len", "1024"], cwd=home.PROJECT_ROOT,
                                 stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops them" not in out_path.read_text() and time.monotonic() < deadline:
            assert serve.poll() is None, out_path.read_text()
            time.sleep(0.5)
        printed = out_path.read_text()
        key_file = root / ".secrets" / "vllm-api-key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
        assert f"API key: on, in {key_file}" in printed and "api_key_env: VLLM_API_KEY" in printed and key not in printed
        port = int(next(w for w in printed.split() if w.startswith("http://") and w.endswith("/v1")).rsplit(":", 1)[1][:-3])
        root_url = f"http://127.0.0.1:{port}"

        def status(path: str, token: str | None, body: bytes | None = None) -> int:
            request = urllib.request.Request(root_url + path, data=body, headers={"Content-Type": "application/json"})
            if token is not None:
                request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return answer.status
            except urllib.error.HTTPError as err:
                return err.code

        completion = b'{"prompt": "1 + 1 =", "max_tokens": 2}'
        for path, body in (("/v1/models", None), ("/v1/completions", completion), ("/invocations", completion),
                           ("/tokenize", b'{"prompt": "x"}'), ("/health", None), ("/metrics", None)):
            assert (status(path, None, body), status(path, "wrong", body)) == (401, 401), path
        assert status("/v1/models", key) == 200 and status("/health", key) == 200
        assert on_command_lines({"the API key": key}) == []  # by environment only: no process shows it in `ps`

        config = EngineConfig(model=str(tiny_model), backend="openai", max_model_len=1024,
                              endpoints=[f"{root_url}/v1"], api_key_env="EVOFORGE_TEST_VLLM_KEY", unavailable_timeout_s=30)
        monkeypatch.setenv("EVOFORGE_TEST_VLLM_KEY", key)
        engine = OpenAIEngine(resolve(config.model), config)
        (texts,) = engine.generate(_requests(1), SamplingConfig(n=2, temperature=0.8, max_tokens=8))
        assert len(texts) == 2 and engine.requests_per_endpoint == {f"{root_url}/v1": 1}
        monkeypatch.setenv("EVOFORGE_TEST_VLLM_KEY", "wrong")
        started = time.monotonic()
        with pytest.raises(KeyRefused, match=r"refused the key in \$EVOFORGE_TEST_VLLM_KEY \(HTTP 401\)") as refused:
            OpenAIEngine(resolve(config.model), config)
        assert time.monotonic() - started < 10 and "\n" not in str(refused.value)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        shutil.rmtree(root, ignore_errors=True)
