"""Paired bootstrap confidence intervals over problems, and the seed-to-seed spread.

Every model answers the same problems, so a difference between two models is estimated from the
per-problem differences d_i = a_i - b_i (i = 1..n), where a_i is model A's outcome on problem i
(correct in {0, 1} with k = 1 sample, or the fraction of k samples; or the response length).

Seeds are pooled per problem: a method trained with seeds s = 1..S has outcome a_i = mean_s a_{s,i}.
The bootstrap then resamples PROBLEMS (n indices drawn with replacement, B times) and recomputes
mean_i d_i on each resample; the 95% interval is the 2.5% and 97.5% percentiles of those B means. This
interval measures how much the difference would move on another draw of problems from the same
distribution, for these trained models: it is conditional on the training seeds that were run. Training
noise is reported beside it as the seed-to-seed spread (`seed_spread`): the metric of each seed alone,
its mean, sample standard deviation (ddof = 1) and range. With 2 seeds the spread is one number, not a
distribution: read it as "how far two runs of the same method landed apart".

Several benchmarks ("strata") are combined as the unweighted mean over benchmarks of each benchmark's
mean (each benchmark counts once, as in eval.metrics.average_summaries); the bootstrap is stratified:
each benchmark's problems are resampled within that benchmark.

A difference is called significant at level 1 - alpha when its interval excludes 0.

For one stratum the bootstrap distribution of the resampled mean has mean dbar and variance exactly
sum_i (d_i - dbar)^2 / n^2 (the plug-in variance over n); the tests compare against that closed form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

# Resamples are drawn in chunks of this many, so memory stays at ~ chunk x n indices.
_CHUNK = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap percentile interval."""

    estimate: float
    lo: float
    hi: float
    confidence: float
    n: int  # problems (summed over strata)
    resamples: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "significant": self.significant}


def _as_strata(values: Sequence[Sequence[float]] | np.ndarray) -> List[np.ndarray]:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = [values]
    strata = [np.asarray(v, dtype=np.float64) for v in values]
    if not strata:
        raise ValueError("bootstrap: no strata (no benchmarks)")
    for j, v in enumerate(strata):
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"bootstrap: stratum {j} must be a non-empty 1-d array, got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"bootstrap: stratum {j} holds non-finite values")
    return strata


def bootstrap_means(
    values: Sequence[Sequence[float]] | np.ndarray, resamples: int = 10000, seed: int = 0
) -> np.ndarray:
    """B bootstrap replicates of mean_j mean_i values[j][i] (problems resampled within each stratum j)."""
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    strata = _as_strata(values)
    rng = np.random.default_rng(seed)
    out = np.zeros(resamples, dtype=np.float64)
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        acc = np.zeros(b, dtype=np.float64)
        for v in strata:
            idx = rng.integers(0, v.size, size=(b, v.size))
            acc += v[idx].mean(axis=1)
        out[start : start + b] = acc / len(strata)
    return out


def bootstrap_interval(
    values: Sequence[Sequence[float]] | np.ndarray, confidence: float = 0.95, resamples: int = 10000, seed: int = 0
) -> Interval:
    """Percentile interval of the (stratified) mean of `values`; pass per-problem DIFFERENCES for a paired CI."""
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must be in (0, 1), got {confidence}")
    strata = _as_strata(values)
    est = float(np.mean([v.mean() for v in strata]))
    reps = bootstrap_means(strata, resamples, seed)
    alpha = 1 - confidence
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return Interval(est, float(lo), float(hi), confidence, int(sum(v.size for v in strata)), resamples)


def paired_difference(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    confidence: float = 0.95,
    resamples: int = 10000,
    seed: int = 0,
) -> Interval:
    """CI of mean(a) - mean(b) from per-problem pairs (a[j][i], b[j][i]): same problems, same order."""
    sa, sb = _as_strata(a), _as_strata(b)
    if [v.size for v in sa] != [v.size for v in sb]:
        raise ValueError(
            f"paired_difference: the two models answered different numbers of problems "
            f"({[v.size for v in sa]} vs {[v.size for v in sb]}); pairs need the same problems"
        )
    return bootstrap_interval([x - y for x, y in zip(sa, sb)], confidence, resamples, seed)


def pool_seeds(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """Per-problem mean over seeds: [S arrays of n] -> [n]."""
    if not per_seed:
        raise ValueError("pool_seeds: no seeds")
    arr = np.stack([np.asarray(x, dtype=np.float64) for x in per_seed])
    return arr.mean(axis=0)


def seed_spread(per_seed_values: Mapping[int, float]) -> Optional[Dict[str, object]]:
    """{per_seed, mean, std (ddof=1), min, max, range} over seeds; None with fewer than 2 seeds."""
    if len(per_seed_values) < 2:
        return None
    v = np.array(list(per_seed_values.values()), dtype=np.float64)
    return {
        "per_seed": {str(k): float(x) for k, x in per_seed_values.items()},
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)),
        "min": float(v.min()),
        "max": float(v.max()),
        "range": float(v.max() - v.min()),
    }
