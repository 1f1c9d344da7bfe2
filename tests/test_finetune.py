"""TRL fine-tuning on a tiny model: SFT and DPO write a checkpoint folder that the engine loads."""
from __future__ import annotations

import math

import pytest

from models.engine import EngineConfig, GenerationRequest, SamplingConfig, load_engine
from models.prompts import solve_messages
from tasks.finetune import FinetuneConfig, finetune
from tasks.pairs import PairsConfig, build_pairs
from test_pairs import crafted


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_trl_training_writes_a_checkpoint_the_engine_loads(tiny_model, scratch, method):
    tables = build_pairs.fn(*crafted(), PairsConfig(sft_per_problem=5))
    data = tables["sft_examples"] if method == "sft" else tables["pairs"]
    folder = scratch / f"ckpt-{method}"
    result = finetune.fn(str(tiny_model), data, FinetuneConfig(method=method, max_steps=2, batch_size=2,
                                                               learning_rate=1e-3), folder)
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert [m["step"] for m in result["metrics"]] == [1, 2]
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert not list(scratch.glob(".*staging*"))
    engine = load_engine(EngineConfig(model=str(folder), backend="transformers"))
    (completions,) = engine.generate([GenerationRequest(solve_messages("1 + 1?"), 0)], SamplingConfig(n=1, max_tokens=4))
    assert completions[0].token_count >= 1 and engine.model_id.startswith(f"ckpt-{method}@")


def test_finetune_refuses_an_empty_training_set(tiny_model, scratch):
    tables = build_pairs.fn(*crafted(), PairsConfig(pairs_per_problem=0))
    with pytest.raises(ValueError, match="no training rows"):
        finetune.fn(str(tiny_model), tables["pairs"], FinetuneConfig(method="dpo"), scratch / "x")
