"""Seeded bootstrap confidence intervals for pass@k scores of an evaluation set.

Percentile bootstrap over problems, with each problem's samples resampled inside it (binomial on its
observed accuracy), seeded. The resamples centre on the plug-in 1 - (1 - c/n)^k, so for k > 1 the
percentiles are moved by its gap to the unbiased estimate. change_interval pairs the two models' problems.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
BLOCK = 1 << 20  # (resample, problem, group) cells drawn at once: tens of MB of temporaries, whatever P is


@dataclass(frozen=True)
class Interval:
    estimate: float  # the plain estimate on the data, not the bootstrap mean
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def format(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


NAN = Interval(math.nan, math.nan, math.nan)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), from n samples of which c are correct."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"correct count {c} is outside [0, n={n}]")
    return float(_table(n, k)[c])


@functools.lru_cache(maxsize=4096)
def _table(n: int, k: int) -> np.ndarray:
    # exact integers and one rounding per entry: pass@1 is c/n exactly and large n cannot overflow
    total = math.comb(n, k)
    table = np.array([(total - math.comb(n - c, k)) / total for c in range(n + 1)])
    table.setflags(write=False)  # shared by every caller through the cache
    return table


def _binomial_pmf(n: int, p: np.ndarray) -> np.ndarray:
    """Binomial(n, p) probabilities of 0..n for each p: (len(p), n + 1); in logs so large n cannot underflow."""
    j = np.arange(n + 1)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log((n - j[1:] + 1) / j[1:]))])
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 or 1: 0 * log(0) is 0 here, not nan
        log_p = np.where(j > 0, j * np.log(p)[:, None], 0.0)
        log_q = np.where(j < n, (n - j) * np.log1p(-p)[:, None], 0.0)
    pmf = np.exp(log_comb + log_p + log_q)
    return pmf / pmf.sum(axis=1, keepdims=True)


def _alias(pmf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias tables for each row of pmf (R, m): pick column j uniformly, keep j with probability
    keep[j], else take alias[j]. One uniform draw per sample, where numpy's binomial costs ~4x more."""
    rows, m = np.arange(len(pmf)), pmf.shape[1]
    scaled = pmf * m  # the mean column holds exactly 1
    keep, alias = np.ones_like(pmf), np.tile(np.arange(m), (len(pmf), 1))
    open_ = np.ones(pmf.shape, dtype=bool)
    for _ in range(m - 1):
        # the smallest open column (<= 1) is settled: it keeps its mass and lends the rest of its slot
        # to the largest (>= 1), which gives that much up; the last open column then holds exactly 1
        small = np.where(open_, scaled, np.inf).argmin(axis=1)
        large = np.where(open_, scaled, -np.inf).argmax(axis=1)
        keep[rows, small], alias[rows, small] = scaled[rows, small], large
        scaled[rows, large] -= 1 - scaled[rows, small]
        open_[rows, small] = False
    return keep, alias


def _counts(n, correct, k: int) -> tuple[np.ndarray, np.ndarray]:
    n, correct = np.asarray(n, dtype=np.int64), np.asarray(correct, dtype=np.int64)
    if n.shape != correct.shape or n.ndim not in (1, 2):
        raise ValueError(f"n and correct must share a shape (P,) or (P, S), got {n.shape} and {correct.shape}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if n.ndim == 1:  # (P,) is (P, 1): one group
        n, correct = n[:, None], correct[:, None]
    if n.size and n.min() < k:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, but the smallest n is {n.min()}")
    if n.size and ((correct < 0) | (correct > n)).any():
        raise ValueError("every correct count must lie in [0, n]")
    return n, correct


class _Scorer:
    """One model's (P, S) counts, with a resampled cell's pass@k drawn from tables of its (n, c), not per cell."""

    def __init__(self, n: np.ndarray, correct: np.ndarray, k: int):
        pairs, which = np.unique(np.stack([n.ravel(), correct.ravel()], axis=1), axis=0, return_inverse=True)
        width = int(pairs[:, 0].max()) + 1
        keep, hit, miss = np.ones((len(pairs), width)), np.zeros((len(pairs), width)), np.zeros((len(pairs), width))
        for size in np.unique(pairs[:, 0]):
            rows, cols = pairs[:, 0] == size, slice(0, size + 1)
            table = _table(int(size), k)
            keep[rows, cols], alias = _alias(_binomial_pmf(int(size), pairs[rows, 1] / size))
            hit[rows, cols], miss[rows, cols] = table, table[alias]
        self.keep, self.hit, self.miss = keep.ravel(), hit.ravel(), miss.ravel()
        self.offset = which.reshape(n.shape) * width  # each cell's row in the flat tables
        self.sides = (n + 1).astype(float)  # a cell's redrawn count is one of 0..n
        # a problem's score is the mean over its groups, the set's the mean over problems
        self.estimate = float(self.hit[self.offset + correct].mean(axis=1).mean())
        # the expected pass@k of a binomial redraw at p = c/n, so the centre the resamples scatter around
        self.plug_in = float((1 - (1 - correct / n) ** k).mean(axis=1).mean())

    def resample(self, rng: np.random.Generator, problems: np.ndarray) -> np.ndarray:
        """Scores of the resampled sets, problems: (B, P) indices -> (B,)."""
        # each group of a chosen problem redraws its n samples: the noise of a finite n, by alias sampling
        x = rng.random(problems.shape + self.sides.shape[1:]) * self.sides[problems]
        column = x.astype(np.int64)
        at = self.offset[problems] + column
        cells = np.where(x - column < self.keep[at], self.hit[at], self.miss[at])
        # every problem has S groups, so the mean over all cells is the mean over problems of group means
        return cells.mean(axis=(1, 2))


def _bootstrap(scorers: list[_Scorer], resamples: int, seed: int) -> np.ndarray:
    """(resamples, len(scorers)) set scores; every scorer sees the same problems in each resample."""
    rng = np.random.default_rng(seed)
    problems = scorers[0].offset.shape[0]
    groups = max(scorer.offset.shape[1] for scorer in scorers)
    block = max(1, BLOCK // (problems * groups))
    scores = np.empty((resamples, len(scorers)))
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        chosen = rng.integers(0, problems, size=(stop - start, problems))
        for j, scorer in enumerate(scorers):
            scores[start:stop, j] = scorer.resample(rng, chosen)
    return scores


def _interval(estimate: float, centre: float, scores: np.ndarray, level: float) -> Interval:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1 - level) / 2
    low, high = np.quantile(scores, [tail, 1 - tail])
    # the resamples scatter around the plug-in centre; move them onto the estimate (no move for k = 1)
    shift = estimate - centre
    return Interval(estimate, float(low + shift), float(high + shift))


def score_interval(n, correct, k: int, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """pass@k of a set with its interval. n, correct: per problem (P,) or per problem and group (P, S)."""
    n, correct = _counts(n, correct, k)
    if n.size == 0:
        return NAN
    s = _Scorer(n, correct, k)
    return _interval(s.estimate, s.plug_in, _bootstrap([s], resamples, seed)[:, 0], level)


def change_interval(
    new_n, new_correct, old_n, old_correct, k: int, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
) -> Interval:
    """pass@k of new minus old on the same problems in the same order, with its paired interval. The two
    may have different numbers of groups (S): a model every seed shares is one group, not S copies."""
    if np.shape(new_n)[:1] != np.shape(old_n)[:1]:
        raise ValueError(
            f"new and old must cover the same problems in the same order: shapes {np.shape(new_n)} and {np.shape(old_n)}"
        )
    new_n, new_correct = _counts(new_n, new_correct, k)
    old_n, old_correct = _counts(old_n, old_correct, k)
    if new_n.size == 0:
        return NAN
    new, old = _Scorer(new_n, new_correct, k), _Scorer(old_n, old_correct, k)
    scores = _bootstrap([new, old], resamples, seed)
    return _interval(new.estimate - old.estimate, new.plug_in - old.plug_in, scores[:, 0] - scores[:, 1], level)
