"""Solution-level pairs and the SFT selection on crafted rollouts."""
from __future__ import annotations

import pyarrow as pa

from data import schemas
from tasks.pairs import PairsConfig, build_pairs, to_dpo_dataset, to_sft_dataset


def crafted():
    problems = pa.Table.from_pylist([
        dict(problem_id=p, question=f"question {p}", answer="1", source="t", source_file="f", source_row=i,
             origin="seed", parent_problem_id=None) for i, p in enumerate(["mixed", "solved", "unsolved"])
    ], schema=schemas.PROBLEMS)
    rows = [  # (rollout, problem, text, tokens, mean logprob, verdict)
        ("m1", "mixed", "long correct", 50, -0.5, "correct"),
        ("m2", "mixed", "short correct", 10, -0.9, "correct"),
        ("m3", "mixed", "short correct", 10, -0.8, "correct"),   # same text as m2: one SFT example
        ("m4", "mixed", "unsure wrong", 20, -2.0, "wrong"),
        ("m5", "mixed", "confident wrong", 20, -0.1, "wrong"),
        ("m6", "mixed", "no box", 20, -0.05, "no_answer"),
        ("s1", "solved", "right", 5, -0.1, "correct"),
        ("u1", "unsolved", "nope", 5, -0.1, "wrong"),
    ]
    rollouts = pa.table({"rollout_id": [r[0] for r in rows], "problem_id": [r[1] for r in rows],
                         "text": [r[2] for r in rows], "completion_tokens": [r[3] for r in rows],
                         "mean_logprob": [r[4] for r in rows]})
    verdicts = pa.table({"rollout_id": [r[0] for r in rows], "verdict": [r[5] for r in rows]})
    stats = pa.table({"problem_id": ["mixed", "solved", "unsolved"], "bucket": ["underperforming", "solved", "unsolved"]})
    return problems, stats, rollouts, verdicts


def test_pairs_take_shortest_correct_against_most_confident_wrong():
    out = build_pairs.fn(*crafted(), PairsConfig(pairs_per_problem=3))
    pairs = out["pairs"].to_pylist()
    assert [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in pairs] == [("m2", "m5"), ("m3", "m4"), ("m1", "m6")]
    assert {p["problem_id"] for p in pairs} == {"mixed"} and {p["kind"] for p in pairs} == {"solution"}
    assert pairs[0]["prompt"] == "question mixed" and pairs[0]["rejected"] == "confident wrong"
    assert len({p["pair_id"] for p in pairs}) == 3


def test_no_pairs_without_both_sides_and_the_count_is_config():
    out = build_pairs.fn(*crafted(), PairsConfig(pairs_per_problem=1))
    assert [(p["chosen_rollout_id"], p["rejected_rollout_id"]) for p in out["pairs"].to_pylist()] == [("m2", "m5")]
    assert build_pairs.fn(*crafted(), PairsConfig(pairs_per_problem=0))["pairs"].num_rows == 0


def test_sft_selects_deduplicated_correct_rollouts_of_learnable_and_underperforming_problems():
    out = build_pairs.fn(*crafted(), PairsConfig(sft_per_problem=5))
    sft = out["sft_examples"].to_pylist()
    assert [(e["rollout_id"], e["bucket"]) for e in sft] == [("m2", "underperforming"), ("m1", "underperforming")]
    capped = build_pairs.fn(*crafted(), PairsConfig(sft_per_problem=1))["sft_examples"]
    assert capped["rollout_id"].to_pylist() == ["m2"]
    with_variant = build_pairs.fn(*crafted(), PairsConfig(), variant_problem_ids=frozenset({"solved"}))
    assert "s1" in with_variant["sft_examples"]["rollout_id"].to_pylist()


def test_exports_are_trl_conversational_datasets():
    out = build_pairs.fn(*crafted(), PairsConfig())
    dpo, sft = to_dpo_dataset(out["pairs"]), to_sft_dataset(out["sft_examples"])
    assert set(dpo.column_names) == {"prompt", "chosen", "rejected"} and len(dpo) == 2
    assert dpo[0]["prompt"][-1] == {"role": "user", "content": "question mixed"}
    assert dpo[0]["chosen"] == [{"role": "assistant", "content": "short correct"}]
    assert set(sft.column_names) == {"prompt", "completion"} and sft[0]["completion"][0]["role"] == "assistant"
