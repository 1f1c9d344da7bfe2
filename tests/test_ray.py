"""Ray backends against the local ones, on a two-node Ray cluster on this machine: verification
(tasks/grading/on_ray.py) must give the local grader pool's verdicts, and generation (models/ray_engine.py)
the in-process vLLM engine's completions.

One cluster serves the module (`ray.cluster_utils.Cluster`: two nodes of one CPU each, its session
folder under .tmp/ray) and is shut down with it. Each `generate` on Ray starts a vLLM engine in an
actor (tens of seconds here), so the engine tests make two such calls in all.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from evoforge.data import home
from evoforge.models.engine import (
    EngineConfig,
    EngineRequestError,
    GenerationRequest,
    RayConfig,
    SamplingConfig,
)
from evoforge.models.loader import load_engine
from evoforge.models.prompts import solve_messages
from evoforge.tasks.verify import VerifyConfig, grade_pairs, verify

pytestmark = pytest.mark.model

CASES = Path(__file__).parent / "data" / "math_verify_cases.jsonl"
DEADLINE_S = 5.0  # long enough for any real answer on a busy 2-core machine; short for the power tower


@pytest.fixture(scope="module")
def cluster_address():
    import ray
    from ray.cluster_utils import Cluster

    from evoforge.models import ray_cluster

    if ray.is_initialized():  # another module's Ray: this module needs its own two-node cluster
        ray.shutdown()
    temp = home.home() / ".tmp" / "ray"  # short: Unix socket paths (see models/ray_cluster.py)
    temp.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": str(temp)})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray_cluster.connect(cluster.address)
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def grading_pairs() -> list[tuple[str, str]]:
    """math-verify's own cases (equivalent forms, sets, intervals, wrong answers) and the verdicts a
    round's rollouts get besides: correct, wrong, no box, a gold that cannot be parsed, and an answer
    that only the deadline stops."""
    cases = [json.loads(line) for line in CASES.read_text().splitlines()]
    return [(c["answer"], c["response"]) for c in cases] + [
        ("72", "48 + 24 = 72, so \\boxed{72}"),
        ("72", "\\boxed{71}"),
        ("5", "The answer is 5."),
        ("", "\\boxed{5}"),
        ("5", "\\boxed{123456789^{123456789}}"),
    ]


def test_ray_graders_give_the_local_pools_verdicts(cluster_address):
    import ray

    pairs = grading_pairs()
    local_config = VerifyConfig(workers=2, deadline_seconds=DEADLINE_S)
    grade_pairs(pairs[:1], local_config)  # starts the local forkserver: its start-up must not eat a deadline
    local = grade_pairs(pairs, local_config)
    on_ray = grade_pairs(pairs, local_config.model_copy(update={"backend": "ray", "ray": RayConfig(address=cluster_address)}))
    assert [r[:3] for r in on_ray] == [r[:3] for r in local]  # verdict, extracted answer, detail
    verdicts = {r[0] for r in on_ray}
    assert {"correct", "wrong", "no_answer", "bad_gold", "timeout"} <= verdicts, verdicts
    assert on_ray[-1][0] == "timeout" and on_ray[-1][3] < DEADLINE_S + 1.5  # killed at the deadline on Ray too
    assert len(ray.nodes()) == 2


def test_the_verify_stage_on_ray_writes_the_local_verdicts_table(cluster_address):
    pairs = grading_pairs()[:-1]  # the power tower is the test above's: no need to wait for it twice
    problems = pa.table({"problem_id": [f"p{i}" for i in range(len(pairs))], "answer": [gold for gold, _ in pairs]})
    # three rollouts per problem: the response, the same boxed answer in other words (graded once,
    # fanned out), and a wrong one
    rows = [(f"r{i}-{k}", f"p{i}", text) for i, (_, response) in enumerate(pairs)
            for k, text in enumerate([response, "In short: " + response, "\\boxed{-1234}"])]
    rollouts = pa.table({"rollout_id": [r[0] for r in rows], "problem_id": [r[1] for r in rows],
                         "text": [r[2] for r in rows]})
    local_config = VerifyConfig(workers=2, deadline_seconds=DEADLINE_S)
    local = verify(rollouts, problems, local_config)
    on_ray = verify(rollouts, problems, local_config.model_copy(
        update={"backend": "ray", "ray": RayConfig(address=cluster_address)}))
    assert on_ray.drop_columns(["seconds"]).equals(local.drop_columns(["seconds"]))
    assert on_ray.num_rows == len(rows) and len(set(on_ray["graded_with"].to_pylist())) < len(rows)


def requests(*seeds: int) -> list[GenerationRequest]:
    return [GenerationRequest(solve_messages(f"What is {s} + 1?", few_shot=False), seed=s) for s in seeds]


@pytest.fixture(scope="module")
def engines(cluster_address, tiny_model, tiny_engine_config):
    """(in-process vLLM engine, Ray Data engine) on the tiny model."""
    from evoforge.models.ray_engine import RayDataEngine
    from evoforge.models.registry import resolve

    ray_config = tiny_engine_config.model_copy(
        update={"backend": "ray", "ray": RayConfig(address=cluster_address, batch_size=4, cpus_per_replica=1)})
    return load_engine(tiny_engine_config), RayDataEngine(resolve(str(tiny_model)), ray_config)


def test_greedy_generation_on_ray_equals_the_in_process_engine(engines):
    local, on_ray = engines
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)
    prompts = requests(1, 2, 3, 4, 5)
    expected, got = local.generate(prompts, greedy), on_ray.generate(prompts, greedy)
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in expected]
    assert [[(c.token_count, c.finish_reason) for c in r] for r in got] == \
        [[(c.token_count, c.finish_reason) for c in r] for r in expected]
    assert [c.mean_logprob for r in got for c in r] == pytest.approx([c.mean_logprob for r in expected for c in r], abs=1e-4)
    assert on_ray.model_id == local.model_id and on_ray.model_id.startswith("tiny-llama-0@")


def test_seeded_samples_on_ray_equal_the_in_process_engines_n_samples(engines):
    """vLLM seeds sample i of a seeded n-sample request with seed + i; Ray's engine sends each sample
    as its own request with that seed, so the samples are the same ones, stop strings included."""
    local, on_ray = engines
    sampling = SamplingConfig(n=3, temperature=0.8, top_p=0.95, max_tokens=16, stop=["ing"])
    prompts = requests(7, 8, 9, 10)
    expected, got = local.generate(prompts, sampling), on_ray.generate(prompts, sampling)
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in expected]
    assert [[(c.token_count, c.finish_reason) for c in r] for r in got] == \
        [[(c.token_count, c.finish_reason) for c in r] for r in expected]
    assert [c.mean_logprob for r in got for c in r] == pytest.approx([c.mean_logprob for r in expected for c in r], abs=1e-4)
    finishes = {c.finish_reason for r in got for c in r}
    assert finishes == {"stop", "length"}, finishes  # both ways of ending are exercised
    uncut = local.generate(prompts, sampling.model_copy(update={"stop": []}))
    assert any("ing" in c.text for r in uncut for c in r)  # and the stop string did cut samples
    assert len({c.text for r in got for c in r}) > 4  # the seeds differ, so do the samples


def test_a_prompt_longer_than_the_context_is_refused_in_one_line(engines):
    _, on_ray = engines
    too_long = GenerationRequest([{"role": "user", "content": "word " * 1200}], seed=0)
    with pytest.raises(EngineRequestError, match="max_model_len 1024"):
        on_ray.generate([too_long], SamplingConfig(n=1, max_tokens=4))
