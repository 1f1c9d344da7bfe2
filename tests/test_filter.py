"""pass@k against a brute-force count, and the difficulty buckets."""
from __future__ import annotations

import itertools

import pyarrow as pa
import pytest

from evoforge.tasks.filter import FilterConfig, bucket, filter_problems, pass_at_k

pytestmark = pytest.mark.unit


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 4, 8])
def test_unbiased_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, 1, n + 1) is None


def test_buckets_follow_the_svs_band():
    band = (0.125, 0.5)
    assert [bucket(c / 8, band) for c in range(9)] == [
        "unsolved", "underperforming", "underperforming", "underperforming", "underperforming",
        "learnable", "learnable", "learnable", "solved",
    ]
    with pytest.raises(ValueError):
        FilterConfig(underperforming=(0.6, 0.5))


def test_filter_counts_every_verdict_and_writes_pass_at_k_per_problem():
    verdicts = pa.table({
        "rollout_id": [f"r{i}" for i in range(12)],
        "problem_id": ["a"] * 8 + ["b"] * 4,
        "verdict": ["correct", "wrong", "no_answer", "timeout", "wrong", "correct", "wrong", "wrong"]
        + ["correct"] * 4,
    })
    rollouts = pa.table({"rollout_id": [f"r{i}" for i in range(12)], "completion_tokens": [10] * 8 + [20] * 4})
    stats = {r["problem_id"]: r for r in filter_problems(verdicts, rollouts, FilterConfig()).to_pylist()}
    assert (stats["a"]["n"], stats["a"]["correct"], stats["a"]["bucket"]) == (8, 2, "underperforming")
    assert dict(stats["a"]["pass_at_k"])[8] == 1.0
    assert dict(stats["a"]["pass_at_k"])[1] == pytest.approx(0.25)
    assert stats["b"]["bucket"] == "solved" and 8 not in dict(stats["b"]["pass_at_k"])
    assert stats["b"]["mean_tokens"] == 20
