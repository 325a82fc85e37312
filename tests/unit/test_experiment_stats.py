"""Paired bootstrap: a case checkable by hand, the closed-form bootstrap variance, and the normal
approximation of a paired Bernoulli difference (tolerances derived from the number of resamples)."""

import math

import numpy as np
import pytest

from egrsd_megatron.experiment.stats import (
    bootstrap_interval,
    bootstrap_means,
    paired_difference,
    pool_seeds,
    seed_spread,
)

Z975 = 1.959963984540054  # standard normal 97.5% quantile
PHI_Z975 = math.exp(-(Z975**2) / 2) / math.sqrt(2 * math.pi)  # its density


def test_two_problems_by_hand():
    # d = (1, 0): a resample of 2 problems has mean 0 (both d=0), 1/2 or 1 with probabilities 1/4, 1/2, 1/4.
    reps = bootstrap_means(np.array([1.0, 0.0]), resamples=40000, seed=3)
    freq = {v: float(np.mean(reps == v)) for v in (0.0, 0.5, 1.0)}
    # Monte Carlo: each frequency has sd sqrt(p(1-p)/B) <= 0.0025; 5 sd.
    assert freq[0.0] == pytest.approx(0.25, abs=0.0125)
    assert freq[0.5] == pytest.approx(0.50, abs=0.0125)
    assert freq[1.0] == pytest.approx(0.25, abs=0.0125)
    ci = bootstrap_interval(np.array([1.0, 0.0]), resamples=40000, seed=3)
    # 2.5% and 97.5% quantiles of that 3-point distribution are 0 and 1 (each end holds 25% > 2.5%).
    assert (ci.estimate, ci.lo, ci.hi) == (0.5, 0.0, 1.0)
    assert not ci.significant


def test_constant_difference_is_a_point_and_significant():
    a = np.array([1, 1, 0, 1, 0], dtype=float)
    ci = paired_difference(a, a - 1)  # every problem: a - b = 1
    assert (ci.estimate, ci.lo, ci.hi) == (1.0, 1.0, 1.0)
    assert ci.significant
    same = paired_difference(a, a)
    assert (same.lo, same.hi) == (0.0, 0.0) and not same.significant


def test_bootstrap_variance_closed_form():
    # Var*(mean of a resample) = sum (d - dbar)^2 / n^2 exactly. The sample variance of B replicates has
    # relative sd sqrt(2 / (B - 1)) (near-normal replicates); allow 5 of those.
    rng = np.random.default_rng(0)
    d = rng.normal(size=150) ** 2
    B = 20000
    reps = bootstrap_means(d, resamples=B, seed=1)
    exact = np.sum((d - d.mean()) ** 2) / d.size**2
    assert reps.var(ddof=1) == pytest.approx(exact, rel=5 * math.sqrt(2 / (B - 1)))
    assert reps.mean() == pytest.approx(d.mean(), abs=5 * math.sqrt(exact / B))


def test_paired_bernoulli_ci_matches_normal_approximation():
    """d_i = x_i - y_i with paired Bernoulli outcomes. The percentile interval tends to dbar -/+ z sigma with
    sigma^2 = sum (d - dbar)^2 / n^2 (the exact bootstrap variance above). Error budget per endpoint:
    Monte Carlo sd of a sample quantile, sqrt(p (1 - p) / B) / f(q) with f(q) = phi(z) / sigma, times 4;
    plus one lattice step 1/n (a resampled mean of integers lives on multiples of 1/n); plus the CLT's
    skewness term for the endpoint, |skew| sigma (z^2 - 1) / 6 (Cornish-Fisher), which is small here."""
    rng = np.random.default_rng(42)
    n = 400
    x = (rng.random(n) < 0.55).astype(float)
    y = np.where(rng.random(n) < 0.7, x, (rng.random(n) < 0.45).astype(float))  # correlated pairs
    B = 20000
    ci = paired_difference(x, y, resamples=B, seed=7)
    d = x - y
    sigma = math.sqrt(np.sum((d - d.mean()) ** 2) / n**2)
    skew = float(np.mean((d - d.mean()) ** 3) / np.mean((d - d.mean()) ** 2) ** 1.5) / math.sqrt(n)
    tol = 4 * math.sqrt(0.025 * 0.975 / B) * sigma / PHI_Z975 + 1 / n + abs(skew) * sigma * (Z975**2 - 1) / 6
    assert ci.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert ci.lo == pytest.approx(d.mean() - Z975 * sigma, abs=tol)
    assert ci.hi == pytest.approx(d.mean() + Z975 * sigma, abs=tol)
    # The difference is real here (x is right more often): the interval should say so.
    assert ci.n == n and ci.resamples == B


def test_strata_are_resampled_within_and_averaged_unweighted():
    # Stratum 1 constant 1 (size 3), stratum 2 constant 0 (size 1): every replicate = (1 + 0) / 2 exactly.
    ci = bootstrap_interval([np.ones(3), np.zeros(1)], resamples=500)
    assert (ci.estimate, ci.lo, ci.hi, ci.n) == (0.5, 0.5, 0.5, 4)


def test_pool_seeds_and_spread():
    np.testing.assert_allclose(pool_seeds([np.array([1.0, 0.0, 1.0]), np.array([0.0, 0.0, 1.0])]), [0.5, 0.0, 1.0])
    assert seed_spread({1: 0.5}) is None
    s = seed_spread({1: 0.4, 2: 0.6})
    assert s["mean"] == pytest.approx(0.5) and s["range"] == pytest.approx(0.2)
    assert s["std"] == pytest.approx(math.sqrt(0.02))  # ddof = 1: ((0.1)^2 + (0.1)^2) / 1


def test_bad_input_errors():
    with pytest.raises(ValueError, match="different numbers of problems"):
        paired_difference(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval(np.array([]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(np.ones(2), confidence=1.5)
