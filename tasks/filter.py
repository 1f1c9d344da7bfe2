"""filter: per-problem accuracy, unbiased pass@k and a difficulty bucket -> `problem_stats`."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from evoforge.data import schemas
from evoforge.data import lake as lake_module
from evoforge.data.lake import in_key_ranges, key_boundaries, sql_batches
from evoforge.data.section import Section
from evoforge.tasks import intervals, summary

EPS = 1e-9


class FilterConfig(Section):
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
    """Unbiased pass@k (tasks/intervals.py: the one estimator evaluate and the intervals use too); None
    when k > n."""
    return None if k > n else intervals.pass_at_k(n, c, k)


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


# filter's ranges hold ids, a verdict and a token count per rollout (~50 bytes), not texts: this many times
# a text stage's rows (KEY_RANGE_ROWS) fit the same memory, with fewer ranges, spill passes and queries
NARROW_RANGE_FACTOR = 8

# Per problem, over every graded verdict: samples, correct ones, their completion tokens (a verdict whose
# rollout is not in `rollouts` counts 0 tokens), the distinct final answers among them and the mean of their
# mean token log-probabilities (what `evoforge sql collapse` tracks over rounds, read here so that the query
# reads 1.25M problems' stats at 10M rollouts, not the verdicts again); pass@k and the bucket are then
# computed over this per-problem table. An input without the answer or log-probability column (a table
# handed to `filter_problems`) leaves that figure NULL, not 0.
PER_PROBLEM = """
SELECT v.problem_id,
       count(*) AS n,
       count(*) FILTER (WHERE v.verdict = 'correct') AS correct,
       coalesce(sum(r.completion_tokens), 0)::BIGINT AS tokens,
       {distinct_answers} AS distinct_answers,
       {mean_logprob} AS mean_logprob
FROM verdicts v LEFT JOIN rollouts r ON r.rollout_id = v.rollout_id
WHERE v.verdict IS DISTINCT FROM 'no_reference'  -- ungraded demonstrations have no accuracy to bucket
GROUP BY v.problem_id
ORDER BY v.problem_id
"""


def filter_problems(verdicts: pa.Table, rollouts: pa.Table, config: FilterConfig) -> pa.Table:
    parts = list(problem_stats_batches(verdicts, rollouts, config))
    return pa.concat_tables(parts) if parts else schemas.PROBLEM_STATS.empty_table()


def problem_stats_batches(verdicts: pa.Table | Iterable[pa.RecordBatch], rollouts: pa.Table | Iterable[pa.RecordBatch],
                          config: FilterConfig, problem_ids: Iterable[str] | pa.ChunkedArray = (),
                          total: int | None = None
                          ) -> Iterator[pa.Table]:
    """`problem_stats` in batches, by problem id. `verdicts` (rollout_id, problem_id, verdict) and
    `rollouts` (rollout_id, problem_id, completion_tokens) may be streams, read once, of `total`
    verdicts: they are then counted range of `problem_ids` by range (`in_key_ranges`), so memory
    holds one range, never the round."""
    if isinstance(verdicts, pa.Table):
        problem_ids, total = verdicts["problem_id"], verdicts.num_rows
    for ranged in in_key_ranges({"verdicts": verdicts, "rollouts": rollouts}, "problem_id",
                                filter_boundaries(problem_ids, total or 0)):
        for _, rows in stats_of_range(config, ranged):
            yield rows


def filter_boundaries(problem_ids: Iterable[str] | pa.ChunkedArray, total: int) -> list[str]:
    """Where filter splits a round of `total` verdicts into ranges of problems."""
    return key_boundaries(problem_ids, total, lake_module.KEY_RANGE_ROWS * NARROW_RANGE_FACTOR)


def stats_of_range(config: FilterConfig, ranged: dict[str, pa.Table]) -> Iterator[tuple[str, pa.Table]]:
    """("problem_stats", rows) of one range's `verdicts` and `rollouts`, in problem order: what the stage
    does per range, in its own process or in a worker of a spread one (data/spread.py)."""
    verdicts, rollouts = ranged["verdicts"], ranged["rollouts"]
    query = PER_PROBLEM.format(
        distinct_answers="count(DISTINCT v.extracted_answer)" if "extracted_answer" in verdicts.column_names
        else "NULL::BIGINT",
        mean_logprob="avg(r.mean_logprob)" if "mean_logprob" in rollouts.column_names else "NULL::DOUBLE")
    for batch in sql_batches(query, verdicts=verdicts, rollouts=rollouts):
        yield "problem_stats", _stats_of_counts(batch, config)


def _stats_of_counts(batch: pa.RecordBatch, config: FilterConfig) -> pa.Table:
    """A problem's pass@k and bucket follow from its (samples, correct) alone, and a round has few such pairs
    (n is G for nearly all): each distinct pair is computed once in Python and the rows take theirs, where a
    Python dict per problem cost a fifth of filter's CPU at 10M rollouts."""
    n, correct = batch.column("n").cast(pa.int64()), batch.column("correct").cast(pa.int64())
    pair = pc.add(pc.multiply(n, (1 << 32)), correct)
    distinct = pc.unique(pair)
    which = pc.index_in(pair, value_set=distinct)
    pass_at, buckets = [], []
    for code in distinct.to_pylist():
        samples, right = code >> 32, code & 0xFFFFFFFF
        pass_at.append([(k, v) for k in config.pass_k if (v := pass_at_k(samples, right, k)) is not None])
        buckets.append(bucket(right / samples, config.underperforming))
    n_float = n.cast(pa.float64())  # float64 division is correctly rounded, as Python's int / int is
    return pa.Table.from_arrays(
        [batch.column("problem_id"), n, correct, pc.divide(correct.cast(pa.float64()), n_float),
         pa.array(pass_at, schemas.PROBLEM_STATS.field("pass_at_k").type).take(which),
         pc.divide(batch.column("tokens").cast(pa.float64()), n_float),
         pa.array(buckets, pa.string()).take(which), batch.column("distinct_answers"), batch.column("mean_logprob")],
        names=schemas.PROBLEM_STATS.names).cast(schemas.PROBLEM_STATS)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    lines = [summary.line("buckets", summary.counts(summary.column(tables, "problem_stats", "bucket")))]
    pass_at = summary.column(tables, "problem_stats", "pass_at_k")
    if pass_at is not None:
        sums: Counter = Counter()
        for row in pass_at.to_pylist():
            sums.update(dict(row))
        lines.append(summary.line("mean pass@k", {f"pass@{k}": f"{v / len(pass_at):.3f}" for k, v in sorted(sums.items())}))
    return lines
