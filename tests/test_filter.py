"""pass@k against a brute-force count, and the difficulty buckets."""
from __future__ import annotations

import itertools
import random

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


def test_every_problem_of_a_large_range_gets_the_stats_its_own_counts_give():
    """Stats are computed once per distinct (samples, correct) pair and taken by each problem: a problem must
    still get exactly what its own counts give, whatever the other problems of its range hold."""
    rng = random.Random(7)
    config = FilterConfig(pass_k=[1, 4, 8, 16])
    samples = [8 if rng.random() < 0.8 else rng.randint(1, 20) for _ in range(5_000)]  # some n < k: no pass@k
    verdicts, rollouts = [], []
    for problem, n in enumerate(samples):
        correct = rng.randint(0, n)
        for i in range(n):
            rollout = f"r{problem}-{i}"
            verdicts.append({"rollout_id": rollout, "problem_id": f"p{problem:05d}", "verdict": "correct" if i < correct else "wrong"})
            rollouts.append({"rollout_id": rollout, "problem_id": f"p{problem:05d}", "completion_tokens": rng.randint(1, 900)})
    stats = filter_problems(pa.Table.from_pylist(verdicts), pa.Table.from_pylist(rollouts), config)
    assert stats.num_rows == len(samples) and stats["problem_id"].to_pylist() == sorted(stats["problem_id"].to_pylist())
    tokens: dict[str, int] = {}
    for row in rollouts:
        tokens[row["problem_id"]] = tokens.get(row["problem_id"], 0) + row["completion_tokens"]
    for row in stats.to_pylist():
        n, correct = row["n"], row["correct"]
        assert n == samples[int(row["problem_id"][1:])]
        assert row["accuracy"] == correct / n and row["mean_tokens"] == tokens[row["problem_id"]] / n
        assert row["bucket"] == bucket(correct / n, config.underperforming)
        assert row["pass_at_k"] == [(k, pass_at_k(n, correct, k)) for k in config.pass_k if k <= n]
