"""Accuracy-length metrics of an evaluation, from per-sample records.

A record is one sampled response: {"problem_index": int, "sample_index": int, "correct": bool,
"num_tokens": int, "truncated": bool, ...}. With n samples of problem i, c_i of them correct:

- avg@k  = mean_i c_i / n_i                                   (mean accuracy over all samples, per problem)
- pass@k = mean_i [1 - C(n_i - c_i, k) / C(n_i, k)]           (unbiased estimator, Chen et al. 2021)
           computed as 1 - prod_{j = n-c+1}^{n} (1 - k / j) to avoid huge binomials; problems with n < k
           are an error (the estimator is undefined there).
- lengths: mean and median response length in tokens over all samples, over correct ones, over wrong ones
  (None when that set is empty).
- truncation_rate = (#samples that hit max_new_tokens without a stop token) / #samples.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for j in range(n - c + 1, n + 1):
        prod *= 1.0 - k / j
    return 1.0 - prod


def _mean(xs: Sequence[float]) -> Optional[float]:
    return float(sum(xs) / len(xs)) if xs else None


def _median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def default_ks(n: int) -> List[int]:
    """pass@k reported for k = 1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def compute_metrics(records: Iterable[Mapping[str, Any]], ks: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Summary dict (see module doc). `ks` defaults to `default_ks(min samples per problem)`."""
    recs = list(records)
    if not recs:
        raise ValueError("compute_metrics: no sample records (nothing was evaluated)")
    by_problem: Dict[Any, List[Mapping[str, Any]]] = defaultdict(list)
    for r in recs:
        by_problem[r["problem_index"]].append(r)
    counts = {p: (len(rs), sum(bool(r["correct"]) for r in rs)) for p, rs in by_problem.items()}
    n_min = min(n for n, _ in counts.values())
    ks = list(ks) if ks is not None else default_ks(n_min)
    lengths = [int(r["num_tokens"]) for r in recs]
    right = [int(r["num_tokens"]) for r in recs if r["correct"]]
    wrong = [int(r["num_tokens"]) for r in recs if not r["correct"]]
    out: Dict[str, Any] = {
        "num_problems": len(by_problem),
        "num_samples": len(recs),
        "samples_per_problem": n_min,
        f"avg@{n_min}": _mean([c / n for n, c in counts.values()]),
    }
    out["accuracy"] = out[f"avg@{n_min}"]
    for k in ks:
        if k > n_min:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem; the smallest problem has {n_min}")
        out[f"pass@{k}"] = _mean([pass_at_k(n, c, k) for n, c in counts.values()])
    out.update(
        {
            "mean_length": _mean(lengths),
            "median_length": _median(lengths),
            "mean_length_correct": _mean(right),
            "median_length_correct": _median(right),
            "mean_length_wrong": _mean(wrong),
            "median_length_wrong": _median(wrong),
            "truncation_rate": _mean([float(bool(r["truncated"])) for r in recs]),
        }
    )
    return out


COUNT_KEYS = ("num_problems", "num_samples")


def average_summaries(summaries: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Unweighted mean over benchmarks of every numeric metric that all benchmarks report (the paper's
    "average" column: each benchmark counts once, whatever its size); problem/sample counts are summed."""
    if not summaries:
        raise ValueError("average_summaries: no benchmarks")
    keys = set.intersection(*(set(s) for s in summaries.values()))
    out: Dict[str, Any] = {}
    for k in sorted(keys):
        if k in COUNT_KEYS:  # sizes are summed, not averaged
            out[k] = int(sum(s[k] for s in summaries.values()))
            continue
        vals = [s[k] for s in summaries.values()]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = float(sum(vals) / len(vals))
    return out
