"""Two SvS rounds on the default model with small sizes: variants, checkpoints and evals for both rounds,
and round 1 really samples from round 0's checkpoint."""
from __future__ import annotations

import json

import pytest

from evoforge.data.lake import lake
from evoforge.app.cli import main


@pytest.mark.model
@pytest.mark.server
def test_two_round_evolve_grows_the_pool_trains_and_evaluates(write_jsonl, prefect_server, runs_root, scratch, capsys):
    from evoforge.data.home import PROJECT_ROOT

    easy = [json.loads(line) for line in (PROJECT_ROOT / "data/sets/easy_arithmetic/train.jsonl").open()]
    pool = write_jsonl(scratch / "pool.jsonl", [r for r in easy if r["steps"] == 1][:8])
    config = scratch / "evolve.yaml"
    config.write_text(f"""
engine: {{model: default}}
sources: [{{path: {pool}, preset: plain, name: easy}}]
generate: {{sampling: {{n: 4, max_tokens: 96, seed: 0}}}}
filter: {{underperforming: [0.25, 0.75]}}
synthesize: {{solutions_per_problem: 1, samples_per_variant: 4, keep_band: [0.25, 1.0],
              synthesis: {{n: 1, max_tokens: 96, seed: 3}}}}
pairs: {{sft_per_problem: 2}}
finetune: {{method: sft, max_steps: 2, batch_size: 2}}
evaluate:
  sets: [{{name: easy-test, path: data/sets/easy_arithmetic/test.jsonl, preset: plain, limit: 4}}]
  sampling: {{n: 2, max_tokens: 64, seed: 7}}
  pass_k: [1, 2]
""")
    assert main(["evolve", "--run", "evo", "--rounds", "2", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    store = lake()
    variants = store.read("evo", "variants")
    assert set(variants["round"].to_pylist()) == {0, 1}
    checkpoints = store.read("evo", "checkpoints").to_pylist()
    assert [c["round"] for c in checkpoints] == [0, 1]
    assert checkpoints[1]["parent_model_id"] == checkpoints[0]["model_id"]  # round 1 trained from round 0's model
    rollouts = store.read("evo", "rollouts", 1, "generate")
    assert set(rollouts["model_id"].to_pylist()) == {checkpoints[0]["model_id"]}
    evals = store.read("evo", "evals").to_pylist()
    assert sorted(e["model_round"] for e in evals) == [0, 1, 2]
    assert all(0.0 <= e["pass_at_1"] <= 1.0 and e["problems"] == 4 for e in evals)
    assert store.read("evo", "train_metrics").num_rows > 0
    kept_in_round_0 = sum(k for k, r in zip(variants["kept"].to_pylist(), variants["round"].to_pylist()) if r == 0)
    assert store.read("evo", "problem_stats", 1, "filter").num_rows == 8 + kept_in_round_0  # the pool grew
    assert "model 2" in printed and (store.run_dir("evo") / "report.png").exists()


@pytest.mark.model
@pytest.mark.server
def test_an_evolve_on_launched_vllm_servers_generates_round_1_from_round_0s_checkpoint(prefect_server, runs_root,
                                                                                    tiny_model, scratch):
    """engine.launch: the round starts two `vllm serve` replicas, restarts them on each new checkpoint,
    and stops them when the command ends."""
    from evoforge.models import vllm_servers

    config = scratch / "served.yaml"
    config.write_text(f"""
engine: {{model: {tiny_model}, backend: openai, max_model_len: 1024, launch: {{replicas: 2, port: 8190}}}}
sources: [{{path: data/sets/easy_arithmetic/train.jsonl, preset: plain, name: easy, limit: 6}}]
generate: {{sampling: {{n: 2, max_tokens: 24, seed: 0}}}}
finetune: {{method: grpo, max_steps: 1, batch_size: 2,
            grpo: {{problems: all, generations: 2, max_completion_tokens: 8}}}}
evaluate:
  sets: [{{name: easy-test, path: data/sets/easy_arithmetic/test.jsonl, preset: plain, limit: 3}}]
  sampling: {{n: 2, max_tokens: 16, seed: 7}}
  pass_k: [1]
stages: [generate, verify, filter, synthesize, pairs, finetune, evaluate]
""")
    assert main(["evolve", "--run", "served", "--rounds", "2", "--config", str(config)]) == 0
    store = lake()
    checkpoints = store.read("served", "checkpoints").to_pylist()
    assert [c["round"] for c in checkpoints] == [0, 1]
    first = store.read("served", "rollouts", 0, "generate")["model_id"].to_pylist()
    second = store.read("served", "rollouts", 1, "generate")["model_id"].to_pylist()
    assert set(first) == {checkpoints[0]["parent_model_id"]} and first[0].startswith("tiny-llama-0@")
    assert set(second) == {checkpoints[0]["model_id"]}  # the new checkpoint reached the servers
    assert len(second) == 6 * 2
    assert sorted(e["model_round"] for e in store.read("served", "evals").to_pylist()) == [0, 1, 2]
    assert not vllm_servers._FLEETS  # the command stopped the replicas it started
    assert vllm_servers._port_free("127.0.0.1", 8190) and vllm_servers._port_free("127.0.0.1", 8191)
