"""filter: per-problem accuracy, unbiased pass@k and a difficulty bucket -> `problem_stats`."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, model_validator

from evoforge.data import schemas
from evoforge.tasks import summary

EPS = 1e-9


class FilterConfig(BaseModel):
    underperforming: tuple[float, float] = Field(
        (0.125, 0.5), description="accuracy band of the SvS 'under-performing' bucket, inclusive"
    )
    pass_k: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="k's of the unbiased pass@k")

    @model_validator(mode="after")
    def _band(self) -> "FilterConfig":
        lo, hi = self.underperforming
        if not 0 < lo <= hi < 1:
            raise ValueError(f"underperforming band must satisfy 0 < low <= high < 1, got {self.underperforming}")
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values must be >= 1, got {self.pass_k}")
        return self


def pass_at_k(n: int, c: int, k: int) -> float | None:
    """Unbiased pass@k, 1 - C(n-c, k) / C(n, k), as a stable product; None when k > n."""
    if k > n:
        return None
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


UNSOLVED, UNDERPERFORMING, LEARNABLE, SOLVED = schemas.BUCKETS


def bucket(accuracy: float, band: tuple[float, float]) -> str:
    if accuracy <= EPS:
        return UNSOLVED
    if accuracy >= 1 - EPS:
        return SOLVED
    if band[0] - EPS <= accuracy <= band[1] + EPS:
        return UNDERPERFORMING
    return LEARNABLE


def correct_counts(verdicts: pa.Table) -> dict[str, tuple[int, int]]:
    """problem_id -> (graded samples, correct samples)."""
    counts: dict[str, list[int]] = {}
    for pid, verdict in zip(verdicts["problem_id"].to_pylist(), verdicts["verdict"].to_pylist()):
        if verdict == "no_reference":
            continue
        row = counts.setdefault(pid, [0, 0])
        row[0] += 1
        row[1] += verdict == "correct"
    return {pid: (n, c) for pid, (n, c) in counts.items()}


@task(name="filter", cache_policy=NO_CACHE, persist_result=False)
def filter_problems(verdicts: pa.Table, rollouts: pa.Table, config: FilterConfig) -> pa.Table:
    tokens_of = dict(zip(rollouts["rollout_id"].to_pylist(), rollouts["completion_tokens"].to_pylist()))
    per_problem: dict[str, list] = {}
    for rollout, problem, verdict in zip(
        verdicts["rollout_id"].to_pylist(), verdicts["problem_id"].to_pylist(), verdicts["verdict"].to_pylist()
    ):
        if verdict == "no_reference":  # ungraded demonstrations have no accuracy to bucket
            continue
        counts = per_problem.setdefault(problem, [0, 0, 0])
        counts[0] += 1
        counts[1] += verdict == "correct"
        counts[2] += tokens_of.get(rollout, 0)
    rows = []
    for problem, (n, correct, tokens) in sorted(per_problem.items()):
        accuracy = correct / n
        rows.append(
            dict(
                problem_id=problem,
                n=n,
                correct=correct,
                accuracy=accuracy,
                pass_at_k=[(k, v) for k in config.pass_k if (v := pass_at_k(n, correct, k)) is not None],
                mean_tokens=tokens / n,
                bucket=bucket(accuracy, config.underperforming),
            )
        )
    return pa.Table.from_pylist(rows, schema=schemas.PROBLEM_STATS)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    lines = [summary.line("buckets", summary.counts(summary.column(tables, "problem_stats", "bucket")))]
    pass_at = summary.column(tables, "problem_stats", "pass_at_k")
    if pass_at is not None:
        sums: Counter = Counter()
        for row in pass_at.to_pylist():
            sums.update(dict(row))
        lines.append(summary.line("mean pass@k", {f"pass@{k}": f"{v / len(pass_at):.3f}" for k, v in sorted(sums.items())}))
    return lines
