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
random walk's running maximum exceeds c sqrt(n) s with probability ~4 P(Z > c) (1.3e-4 at c = 4); the
largest |result| over many outputs of the same kind is a stand-in of the same size.
A dot product also rounds each of its n
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

FP32_U = 2.0**-24  # unit roundoff of float32 (round to nearest): half its machine epsilon
FP32_EPS = 2.0**-23  # machine epsilon of float32, 1.19e-7
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
BF16_EPS = 2.0**-7  # machine epsilon of bfloat16, 7.8e-3


def sum_tol(n_terms: int, magnitude: float, sigmas: float = 4.0, unit_roundoff: float = FP32_U) -> float:
    """Random-walk tolerance on |a - b| for two orderings of an n-term sum: sigmas * u * sqrt(2n/3) * M.

    `n_terms`: the number of terms whose summation order differs between the two sides (n >= 1);
    `magnitude`: a bound M on the partial sums (see the module docstring); `sigmas`: the safety factor
    (4: a 6e-5 two-sided Gaussian tail per comparison).
    """
    if n_terms < 1 or magnitude < 0 or sigmas <= 0:
        raise ValueError(
            f"sum_tol: need n_terms >= 1, magnitude >= 0, sigmas > 0; got {n_terms}, {magnitude}, {sigmas}"
        )
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


def transformer_terms(arch, seq_len: int, tokens: int = 1, backward: bool = False) -> int:
    """Roundings along one output's dependency chain in a decoder-only transformer (`arch`: a ModelArch).

    Per layer, forward: RMSNorm's sum of squares (H), the QKV projection (a length-H dot product: H
    products + H additions, 2H), QK-norm (head_dim, if on), scores (2 head_dim), the softmax sum and
    the probabilities x values (seq_len, 2 seq_len), the output projection (2 heads*head_dim), the
    second RMSNorm (H), the gate/up projection (2H), the down projection (2F) and ~20 elementwise ops
    (RoPE, SwiGLU, residual adds, scalings); then the final RMSNorm (H) and the LM head (2H).
    Backward (`backward=True`) runs the transposed chain once more (x2) and sums each weight gradient
    over the `tokens` positions of the batch (2 tokens). This is an error-propagation count for
    `fp32_rel_tol` (the errors of the stages add as independent roundings; the normalised, residual
    networks of this project do not amplify them beyond O(1), as the tests' measurements confirm).
    """
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    per_layer = (
        h
        + 2 * h
        + (d if arch.qk_norm else 0)
        + 2 * d
        + 3 * seq_len
        + 2 * arch.num_attention_heads * d
        + h
        + 2 * h
        + 2 * f
        + 20
    )
    forward = arch.num_layers * per_layer + h + 2 * h
    return 2 * forward + 2 * tokens if backward else forward


def adam_update_change(lr: float, eps: float, grad_diff: float, c: float = 2.0) -> float:
    """Bound on how much one AdamW step's update moves when its gradient moves by `grad_diff`: c lr dg / eps.

    Adam's update lr m_hat / (sqrt(v_hat) + eps) has |d update / d g| <= lr ((1 - beta1) / (1 - beta1^t)
    + O(1)) / eps; c = 2 covers betas (0.9, 0.95 .. 0.999) from t = 2 on (c ~= 1 at t = 3, betas
    (0.9, 0.999)). Holds per element and in L2. This is why a comparison after an optimizer step needs an
    eps well above the gradients' rounding noise: at eps = 1e-8, a 1e-9 rounding difference in a near-zero
    gradient component can flip an lr-sized step; at eps = 1e-4 it moves the update by ~lr * 1e-5.
    """
    if lr < 0 or eps <= 0 or grad_diff < 0:
        raise ValueError(f"adam_update_change: need lr >= 0, eps > 0, grad_diff >= 0; got {lr}, {eps}, {grad_diff}")
    return c * lr * grad_diff / eps
