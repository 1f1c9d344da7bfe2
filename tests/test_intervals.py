"""Bootstrap intervals for pass@k: closed forms, a hand-computed paired case, and the input contract."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evoforge.tasks.intervals import Interval, change_interval, pass_at_k, score_interval

pytestmark = pytest.mark.unit


def test_equal_accuracies_give_the_binomial_interval():
    # every problem has accuracy p, so resampling problems changes nothing and the resampled score is
    # Binomial(nP, p) / (nP): its 2.5% and 97.5% points are p -+ 1.96 sd to well within 1% of the
    # half-width (skew ~0.03, lattice 1/1600). The percentile of 4000 resamples has a standard error
    # sqrt(.025 * .975 / 4000) / density = 0.00046 here, so 10% of the half-width (0.0021) is ~4.6 errors.
    problems, n, c = 200, 8, 2
    p = c / n
    iv = score_interval([n] * problems, [c] * problems, 1, resamples=4000)
    half = 1.96 * math.sqrt(p * (1 - p) / (n * problems))
    assert iv.estimate == p
    assert iv.low == pytest.approx(p - half, abs=0.1 * half)
    assert iv.high == pytest.approx(p + half, abs=0.1 * half)


def test_paired_change_matches_the_hand_computation():
    # all-correct or all-wrong samples, so redrawing them changes nothing: per-problem differences are
    # [1, 0, 0, 0] and a resample's change is X / 4 with X ~ Binomial(4, 1/4).
    # P(X = 0) = 81/256 = 0.316 > 0.025, so the 2.5% point is 0;
    # P(X <= 2) = (81 + 108 + 54)/256 = 243/256 = 0.949 < 0.975 <= P(X <= 3) = 255/256, so the 97.5% point is 3/4
    n = [4, 4, 4, 4]
    iv = change_interval(n, [4, 0, 0, 0], n, [0, 0, 0, 0], 1, resamples=4000)
    assert (iv.estimate, iv.low, iv.high) == (0.25, 0.0, 0.75)


def test_pairing_removes_the_spread_between_problems():
    # accuracies from 10% to 70% across problems, the new model 20 points better on every one
    problems, n = 200, 200
    old = np.linspace(20, 140, problems).astype(int)
    new = old + 40
    counts = np.full(problems, n)
    change = change_interval(counts, new, counts, old, 1)
    assert change.estimate == pytest.approx(0.2)
    assert not change.contains(0.0)
    paired_width = change.high - change.low
    for correct in (old, new):
        alone = score_interval(counts, correct, 1)
        assert paired_width < 0.5 * (alone.high - alone.low)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_interval_for_k_above_one_contains_the_estimate():
    # redrawing c ~ Binomial(n, c/n) centres the resamples on 1 - (1 - c/n)^k, below the unbiased
    # estimate for k > 1: here by more than the half-width, so this fails without re-centring
    rng = np.random.default_rng(1)
    n = np.full(2000, 16)
    correct = rng.binomial(n, rng.uniform(0, 1, 2000))
    iv = score_interval(n, correct, 4, resamples=500)
    assert iv.estimate == pytest.approx(np.mean([pass_at_k(16, int(c), 4) for c in correct]))
    assert iv.contains(iv.estimate)
    with pytest.raises(ValueError, match=r"k=4.*smallest n is 3"):
        score_interval([8, 3, 5], [1, 1, 1], 4)


def test_identical_groups_give_the_single_group_estimate():
    n, correct = np.array([8, 8, 16, 4]), np.array([1, 5, 16, 0])
    single = score_interval(n, correct, 2)
    grouped = score_interval(np.tile(n[:, None], 3), np.tile(correct[:, None], 3), 2)
    assert grouped.estimate == pytest.approx(single.estimate, rel=1e-12)  # a mean of 3 equal floats may move 1 ulp
    # with equal accuracies all the noise is inside problems, and three groups redraw three times the
    # samples: the width shrinks by about sqrt(3), to 0.58 of one group's
    one, three = score_interval([8] * 50, [3] * 50, 2), score_interval([[8] * 3] * 50, [[3] * 3] * 50, 2)
    assert three.high - three.low < 0.75 * (one.high - one.low)


def test_seed_fixes_the_interval():
    n, correct = [10] * 30, list(range(10)) * 3
    first, again = score_interval(n, correct, 1, seed=3), score_interval(n, correct, 1, seed=3)
    assert first == again
    other = score_interval(n, correct, 1, seed=4)
    assert (other.low, other.high) != (first.low, first.high)
    assert other.estimate == first.estimate


def test_inputs_are_checked():
    nan = score_interval([], [], 1)
    assert all(math.isnan(v) for v in (nan.estimate, nan.low, nan.high))
    with pytest.raises(ValueError):
        score_interval([4, 4], [5, 1], 1)
    with pytest.raises(ValueError):
        score_interval([4, 4], [-1, 1], 1)
    with pytest.raises(ValueError, match="same problems"):
        change_interval([4, 4], [1, 1], [4, 4, 4], [1, 1, 1], 1)


def test_interval_reads_as_estimate_and_bounds():
    iv = Interval(0.1934, 0.12, 0.2704)
    assert iv.format() == "0.193 [0.120, 0.270]"
    assert iv.contains(0.12) and not iv.contains(0.3)


def test_a_model_every_seed_shares_is_one_group_not_several_copies():
    """The starting model measured with one seed in every run is one measurement: tiling it into S
    identical groups would pretend its samples were drawn S times and narrow the change's interval."""
    rng = np.random.default_rng(3)
    new_n = np.full((40, 3), 4)
    new_c = rng.integers(0, 5, size=(40, 3))
    old_c = rng.integers(0, 5, size=40)
    once = change_interval(new_n, new_c, np.full(40, 4), old_c, 1, seed=1)
    tiled = change_interval(new_n, new_c, np.full((40, 3), 4), np.repeat(old_c[:, None], 3, axis=1), 1, seed=1)
    assert once.estimate == pytest.approx(tiled.estimate)
    assert (once.high - once.low) > (tiled.high - tiled.low)
