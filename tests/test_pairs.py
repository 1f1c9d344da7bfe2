"""Solution-level pairs and the SFT selection on crafted rollouts."""
from __future__ import annotations

import pytest

from evoforge.tasks.finetune import dpo, sft
from evoforge.tasks.finetune.config import FinetuneConfig
from evoforge.tasks.pairs import PairsConfig, build_pairs

pytestmark = pytest.mark.unit


def test_pairs_take_shortest_correct_against_most_confident_wrong(graded_round):
    out = build_pairs(*graded_round, PairsConfig(pairs_per_problem=3))
    pairs = out["pairs"].to_pylist()
    assert [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in pairs] == [("m2", "m5"), ("m3", "m4"), ("m1", "m6")]
    assert {p["problem_id"] for p in pairs} == {"mixed"} and {p["kind"] for p in pairs} == {"solution"}
    assert pairs[0]["prompt"] == "question mixed" and pairs[0]["rejected"] == "confident wrong"
    assert len({p["pair_id"] for p in pairs}) == 3


def test_no_pairs_without_both_sides_and_the_count_is_config(graded_round):
    out = build_pairs(*graded_round, PairsConfig(pairs_per_problem=1))
    assert [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in out["pairs"].to_pylist()] == [("m2", "m5")]
    assert build_pairs(*graded_round, PairsConfig(pairs_per_problem=0))["pairs"].num_rows == 0


def test_sft_selects_deduplicated_correct_rollouts_of_learnable_and_underperforming_problems(graded_round):
    out = build_pairs(*graded_round, PairsConfig(sft_per_problem=5))
    sft = out["sft_examples"].to_pylist()
    assert [(e["rollout_id"], e["bucket"]) for e in sft] == [("m2", "underperforming"), ("m1", "underperforming")]
    capped = build_pairs(*graded_round, PairsConfig(sft_per_problem=1))["sft_examples"]
    assert capped["rollout_id"].to_pylist() == ["m2"]
    with_variant = build_pairs(*graded_round, PairsConfig(), variant_problem_ids=frozenset({"solved"}))
    assert "s1" in with_variant["sft_examples"]["rollout_id"].to_pylist()


def test_exports_are_trl_conversational_datasets(graded_round):
    out = build_pairs(*graded_round, PairsConfig())
    dpo_rows = dpo.dataset(out["pairs"], FinetuneConfig(), None)
    sft_rows = sft.dataset(out["sft_examples"], FinetuneConfig(), None)
    assert set(dpo_rows.column_names) == {"prompt", "chosen", "rejected"} and len(dpo_rows) == 2
    assert dpo_rows[0]["prompt"][-1] == {"role": "user", "content": "question mixed"}
    assert dpo_rows[0]["chosen"] == [{"role": "assistant", "content": "short correct"}]
    assert set(sft_rows.column_names) == {"prompt", "completion"} and sft_rows[0]["completion"][0]["role"] == "assistant"
