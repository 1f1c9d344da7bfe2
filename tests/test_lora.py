"""LoRA (finetune.lora): a checkpoint published merged loads as any model; one published as an adapter names
its base, and the evaluate stage generates from it on the in-process vLLM engine and on a launched `vllm serve`
replica, which apply the adapter on the base (vLLM's LoRA support), with the same completions."""
from __future__ import annotations

from pathlib import Path

import pytest

from evoforge.data.home import PROJECT_ROOT
from test_training_processes import finetune, round_config, seed_round


def _evaluated_texts(run: str, model_id: str) -> list[str]:
    """The model's held-out completions, in problem and sample order (rollout ids differ from model to model)."""
    from evoforge.data.lake import lake

    rows = [r for r in lake().read(run, "rollouts", 0, "evaluate").to_pylist() if r["model_id"] == model_id]
    return [r["text"] for r in sorted(rows, key=lambda r: (r["problem_id"], r["sample_index"]))]


@pytest.mark.model
@pytest.mark.server
def test_lora_checkpoints_merged_and_as_an_adapter_are_evaluated_in_process_and_served(prefect_server, runs_root, tiny_model):
    from evoforge.flows.evaluate import evaluate_flow
    from evoforge.models.engine import EngineConfig, LaunchConfig
    from evoforge.models.registry import resolve

    base = resolve(str(tiny_model))
    evaluate = {"sets": [{"name": "arith", "path": str(PROJECT_ROOT / "data/sets/easy_arithmetic/test.jsonl"), "preset": "plain",
                          "limit": 3}], "sampling": {"n": 2, "temperature": 0.8, "max_tokens": 12, "seed": 7}, "pass_k": [1]}
    texts = {}
    for merge in (True, False):
        run = f"lora-{'merged' if merge else 'adapter'}"
        seed_round(run)
        config = round_config(tiny_model, method="sft", max_steps=2, batch_size=4, learning_rate=1e-2,
                              lora={"r": 8, "alpha": 16, "dropout": 0.0, "merge": merge}).model_copy(
            update={"evaluate": round_config(tiny_model).evaluate.model_validate(evaluate)})
        row, metrics = finetune(run, config)
        folder = resolve(row["path"]).adapter or row["path"]
        files = {p.name for p in Path(folder).iterdir()}
        if merge:
            assert row["adapter"] is False and row["base_model_id"] is None and "model.safetensors" in files
        else:  # the adapter alone, a fraction of the model, with the record of its base
            assert row["adapter"] is True and row["base_model_id"] == base.model_id
            assert {"adapter_model.safetensors", "adapter_config.json", "evoforge_base.json"} <= files
            assert "model.safetensors" not in files
            assert resolve(row["path"]).path == base.path and resolve(row["path"]).model_id == row["model_id"]
        assert evaluate_flow(run, 0, config).status == "completed"
        in_process = _evaluated_texts(run, row["model_id"])
        baseline = _evaluated_texts(run, base.model_id)
        assert len(in_process) == 6 and in_process != baseline  # the trained weights (or the adapter) were applied
        served = config.model_copy(update={"engine": EngineConfig(model=str(tiny_model), backend="openai", max_model_len=1024,
                                                                   launch=LaunchConfig(replicas=1, port=8190))})
        assert evaluate_flow(run, 0, served, force=True).status == "completed"
        assert _evaluated_texts(run, row["model_id"]) == in_process  # the replica served the same model
        texts[merge] = in_process
    assert texts[True] == texts[False]  # merged weights and base + adapter: the same completions
