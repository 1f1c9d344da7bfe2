"""SvS online (`finetune.method: svs`): the synthesis reward's band rule, one batch out of three kinds of
rows, and a few steps on the tiny model through the finetune processes, with the variants the policy wrote
recorded as `variants` rows (origin 'online')."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from evoforge.tasks.finetune.config import FinetuneConfig


@pytest.mark.unit
def test_a_synthesis_is_rewarded_by_its_variants_accuracy_band():
    from evoforge.tasks.synthesize import synthesis_reward

    band = (0.125, 0.625)
    assert [synthesis_reward(a, 8, band) for a in (0.0, 0.125, 0.5, 0.625, 0.75, 1.0)] == [0, 1, 1, 1, 0, 0]
    assert synthesis_reward(0.5, 8, band, rejected=True) == 0.0  # an answer leak or a copy earns nothing
    assert synthesis_reward(0.5, 0, band) == 0.0  # never solved
    assert synthesis_reward(1 / 8, 8, band) == 1.0 and synthesis_reward(5 / 8, 8, band) == 1.0  # the band is inclusive


@pytest.mark.unit
def test_three_kinds_of_scored_rows_become_one_padded_batch_and_uniform_groups_drop_out():
    import torch

    from evoforge.tasks.finetune.svs import _concat, _rows, group_accuracy

    def scored(rows, prompt_len, completion_len, advantages):
        return {"prompt_ids": torch.full((rows, prompt_len), 7), "prompt_mask": torch.ones(rows, prompt_len, dtype=torch.long),
                "completion_ids": torch.full((rows, completion_len), 9),
                "completion_mask": torch.ones(rows, completion_len, dtype=torch.long),
                "advantages": torch.tensor(advantages), "num_items_in_batch": torch.tensor(rows * completion_len)}

    solve, synth, variant = scored(2, 3, 4, [0.5, -0.5]), scored(2, 5, 2, [0.0, 0.0]), scored(4, 2, 3, [1.0, -1.0, 0.0, 0.0])
    batch = _concat([solve, synth, variant], pad_token_id=0)
    assert batch["prompt_ids"].shape == (8, 5) and batch["completion_ids"].shape == (8, 4)
    assert batch["prompt_ids"][0].tolist() == [0, 0, 7, 7, 7]  # prompts padded on the left
    assert batch["completion_ids"][2].tolist() == [9, 9, 0, 0] and batch["completion_mask"][2].tolist() == [1, 1, 0, 0]
    assert int(batch["num_items_in_batch"]) == 2 * 4 + 2 * 2 + 4 * 3
    kept = _rows(batch, batch["advantages"] != 0)
    assert kept["advantages"].tolist() == [0.5, -0.5, 1.0, -1.0] and int(kept["num_items_in_batch"]) == 2 * 4 + 2 * 3
    assert group_accuracy([1, 0, 0, 0, 1, 1, 1, 1], 4) == [0.25, 1.0]


@pytest.fixture(scope="module")
def parrot(tiny_model, tmp_path_factory):
    """The tiny model taught one reply, whatever it is asked: a variant problem and a boxed 4. Random weights
    never answer; this one answers the problems whose answer is 4 and writes a variant when asked for one."""
    from evoforge.data import home
    from evoforge.tasks.finetune.training import train_in_process

    reply = "Problem: What is two plus two?\n\n\\boxed{4}"
    rows = pa.Table.from_pylist([dict(prompt=f"What is {i} + {4 - i}? Write a new problem.", completion=reply)
                                 for i in range(8)])
    folder = home.home() / ".tmp" / "tests" / f"parrot-{tmp_path_factory.getbasetemp().name}"
    config = FinetuneConfig(method="sft", max_steps=40, batch_size=8, learning_rate=3e-3, few_shot=False, report_to=[],
                            guard={"held_out_rows": 0})
    train_in_process(str(tiny_model), {"sft": rows}, config, folder)
    return folder


@pytest.mark.model
def test_svs_trains_solving_synthesizing_and_variant_solving_in_one_update(parrot, scratch):
    from evoforge.tasks.finetune.launch import train_policy

    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + {4 - i if i < 2 else 9}?",
                                          answer="4" if i < 2 else str(i + 9)) for i in range(4)])
    config = FinetuneConfig(method="svs", max_steps=2, batch_size=4, grpo_generations=2, grpo_max_completion_tokens=24,
                            learning_rate=1e-5, few_shot=False, report_to=[], guard={"held_out_rows": 0},
                            svs={"solve_band": [0.125, 1.0], "synthesis_band": [0.125, 1.0], "variant_generations": 3,
                                 "dynamic_sampling": False})
    result = train_policy.fn(str(parrot), {"svs": problems}, config, scratch / "ckpt")
    assert result["steps"] == 2 and all(math.isfinite(m["loss"]) for m in result["metrics"] if "loss" in m)
    steps = [m for m in result["metrics"] if "loss" in m]
    solved_fours = [m for m in steps if m["svs/synthesize_rows"] > 0]
    assert solved_fours, steps  # a step whose batch held a problem answered 4 wrote variants from its solution
    for m in solved_fours:  # the trainer's per-kind counts: all three kinds in one batch, every row trained
        assert m["svs/solve_rows"] == 4 and m["svs/synthesize_rows"] % config.grpo_generations == 0
        assert m["svs/variant_rows"] > 0 and m["svs/variant_rows"] % config.svs.variant_generations == 0
        assert m["svs/rows_trained"] == m["svs/solve_rows"] + m["svs/synthesize_rows"] + m["svs/variant_rows"]
    for name in ("svs/solve_reward", "svs/synthesis_reward", "svs/variant_accuracy", "svs/entropy"):
        assert all(name in m for m in steps)
    variants = result["tables"]["variants"]
    assert variants and {v["origin"] for v in variants} == {"online"}
    assert {v["step"] for v in variants} <= {1, 2} and all(v["answer"] == "4" for v in variants)
    valid = [v for v in variants if v["reject_reason"] in (None, "outside_band")]
    assert valid and all(v["n"] == 3 and v["reward"] == (1.0 if v["kept"] else 0.0) for v in valid)
    assert any(v["reject_reason"] == "near_duplicate_of_pool" for v in variants)  # the same variant twice: once solved
    assert (scratch / "ckpt" / "model.safetensors").exists() and not (scratch / "ckpt" / "tables").exists()
