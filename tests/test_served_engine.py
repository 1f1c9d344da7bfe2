"""Generation on `vllm serve` replicas (models/openai_engine.py, models/vllm_servers.py): two real
replicas of the tiny model on this machine's two cores, against the in-process engine."""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from evoforge.models.engine import EngineConfig, GenerationRequest, LaunchConfig, SamplingConfig
from evoforge.models.loader import load_engine
from evoforge.models.prompts import solve_messages

PORT = 8170  # the fleet takes the first free ports from here


@pytest.fixture(scope="module")
def served(tiny_model):
    """An engine over two launched replicas; stopped at the end of the module."""
    from evoforge.models.openai_engine import OpenAIEngine
    from evoforge.models.registry import resolve

    config = EngineConfig(model=str(tiny_model), backend="openai", max_model_len=1024,
                          launch=LaunchConfig(replicas=2, port=PORT), unavailable_timeout_s=60)
    engine = OpenAIEngine(resolve(config.model), config)
    yield engine
    engine.sleep()
    assert all(not r.alive for r in engine.fleet.running) and not engine.fleet.running


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
    rollouts = generate.fn(problems, served, config)
    killer.join()
    assert not victim.alive
    expected = generate.fn(problems, load_engine(tiny_engine_config), config)
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
        nodes[name] = search.fn(problems, engine, config, VerifyConfig(workers=1))["mcts_nodes"].sort_by("node_id")
    assert nodes["served"].num_rows > 2
    assert nodes["served"].select(["node_id", "step_text", "exec_output", "q_value", "visits"]).equals(
        nodes["local"].select(["node_id", "step_text", "exec_output", "q_value", "visits"]))

    judged = pa.table({"problem_id": ["a", "b"], "question": ["What is 2 + 3?", "What is 4 * 5?"],
                       "expert_answer": ["2 + 3 = 5. \\boxed{5}", "4 * 5 = 20. \\boxed{20}"]})
    answers = pa.table({"rollout_id": ["r1", "r2"], "problem_id": ["a", "b"], "text": ["\\boxed{5}", "\\boxed{21}"]})
    critic = CriticConfig(sampling=SamplingConfig(n=1, temperature=0.7, max_tokens=24, seed=3))
    served_judgments = judge.fn(judged, answers, served, critic).sort_by("rollout_id")
    local_judgments = judge.fn(judged, answers, local, critic).sort_by("rollout_id")
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
