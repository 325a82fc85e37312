"""Tolerances for comparing two floating-point computations that differ only in reduction order.

A cross-layout (TP/PP/DP/ZeRO) or cross-engine comparison computes the same real number twice; the two
results differ because the terms of some reductions are added in a different order (a TP split of a
matmul's inner dimension, an all-reduce, a vocab-parallel logsumexp, a BLAS kernel's blocking). This
module turns "how many terms, of what size, in what dtype" into a tolerance, so that a test's tolerance
follows from the arithmetic and not from what one machine happened to produce.

Error model (recursive summation, Higham, "Accuracy and Stability of Numerical Algorithms", ch. 4):
summing x_1..x_n makes n-1 roundings, the k-th of size delta_k * S_k with |delta_k| <= u (the unit
roundoff) and S_k the k-th partial sum. With |S_k| <= M:

* worst case (`sum_bound`): |error| <= (n-1) u M per side, so two orderings differ by <= 2 (n-1) u M;
* random walk (`sum_tol`): the delta_k behave as independent with std <= u / sqrt(3) (uniform on
  [-u, u]; round-to-nearest's real spread is smaller, ~0.42 u), so one side's error has
  std <= u sqrt(n / 3) M and the difference of two independently rounded orderings
  std <= u sqrt(2 n / 3) M. The tolerance is `sigmas` of those standard deviations.

`magnitude` M is a bound on the partial sums: for same-sign terms (a softmax denominator, a sum of
squares) the total; for zero-mean terms of std s (a dot product of random vectors) 4 sqrt(n) s, since a
random walk's running maximum exceeds c sqrt(n) s with probability ~4 P(Z > c) (2.5e-4 at c = 4); the
largest |result| over many outputs of the same kind is a stand-in of the same size. A dot product also rounds each of its n
products (errors <= u |a_i b_i|, smaller than the partial sums' for n >= 2): count them by passing
`n_terms = 2 n` when they matter. Reductions in sequence (a chain of matmuls, or layers) add
independent errors: pass the sum of their term counts, with M the largest magnitude along the chain,
and write down in the test how the later stages amplify an earlier one's error (O(1) for the
normalised, residual networks in this project).

Blocked or pairwise summation (BLAS, torch.sum) has smaller errors than recursive summation, so the
estimate is an upper one there: by up to sqrt(n / log2 n), which is why `sum_tol` and not `sum_bound`
is the default (the worst case would be absurdly loose for large n).
"""
from __future__ import annotations

import math

FP32_U = 2.0 ** -24     # unit roundoff of float32 (round to nearest): half its machine epsilon
FP32_EPS = 2.0 ** -23   # machine epsilon of float32, 1.19e-7
BF16_U = 2.0 ** -8      # unit roundoff of bfloat16 (8 significant bits)
BF16_EPS = 2.0 ** -7    # machine epsilon of bfloat16, 7.8e-3


def sum_tol(n_terms: int, magnitude: float, sigmas: float = 4.0, unit_roundoff: float = FP32_U) -> float:
    """Random-walk tolerance on |a - b| for two orderings of an n-term sum: sigmas * u * sqrt(2n/3) * M.

    `n_terms`: the number of terms whose summation order differs between the two sides (n >= 1);
    `magnitude`: a bound M on the partial sums (see the module docstring); `sigmas`: the safety factor
    (4: a 6e-5 two-sided Gaussian tail per comparison).
    """
    if n_terms < 1 or magnitude < 0 or sigmas <= 0:
        raise ValueError(f"sum_tol: need n_terms >= 1, magnitude >= 0, sigmas > 0; got "
                         f"{n_terms}, {magnitude}, {sigmas}")
    return sigmas * unit_roundoff * math.sqrt(2.0 * n_terms / 3.0) * magnitude


def fp32_sum_tol(n_terms: int, magnitude: float, sigmas: float = 4.0) -> float:
    """`sum_tol` for float32 (u = 2^-24): e.g. n = 1024 terms of partial sums <= 1 gives 6.2e-6."""
    return sum_tol(n_terms, magnitude, sigmas, FP32_U)


def fp32_rel_tol(n_terms: int, sigmas: float = 4.0) -> float:
    """`fp32_sum_tol` relative to the magnitude (M = 1): for comparisons normalised by the result's size."""
    return fp32_sum_tol(n_terms, 1.0, sigmas)


def sum_bound(n_terms: int, magnitude: float, unit_roundoff: float = FP32_U) -> float:
    """Worst-case |a - b| for two orderings of an n-term sum: 2 (n-1) u M (first order in n u)."""
    if n_terms < 1 or magnitude < 0:
        raise ValueError(f"sum_bound: need n_terms >= 1 and magnitude >= 0; got {n_terms}, {magnitude}")
    return 2.0 * max(n_terms - 1, 1) * unit_roundoff * magnitude
