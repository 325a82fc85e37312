"""egrsd_megatron.testing.tolerance against a Monte-Carlo measurement of float32 summation error.

Each trial sums the same n float32 numbers in two orders, sequentially in float32 (np.cumsum is a
strict left-to-right accumulation, the error model's recursive summation), and records |a - b|. The
4-sigma tolerance must bound every trial (2000 trials: a true 4-sigma tail would be exceeded ~0.1
times) and must not be absurdly loose (the worst trial reaches at least 1/20 of its tolerance).
M is each trial's own largest |partial sum|, as the tolerance's docstring defines it.
"""

import numpy as np
import pytest

from egrsd_megatron.testing.tolerance import (
    BF16_EPS,
    FP32_EPS,
    FP32_U,
    adam_update_change,
    fp32_rel_tol,
    fp32_sum_tol,
    sum_bound,
    sum_tol,
)

TRIALS = 2000


def _order_differences(x: np.ndarray, rng: np.random.Generator) -> tuple:
    """Per row: |sum(x) - sum(x permuted)|, both summed sequentially in float32, and the largest
    |partial sum| of either order (exact, in float64): the error model's M."""
    y = np.take_along_axis(x, np.argsort(rng.random(x.shape), axis=1), axis=1)
    a = np.cumsum(x, axis=1, dtype=np.float32)[:, -1]
    b = np.cumsum(y, axis=1, dtype=np.float32)[:, -1]
    partial = np.maximum(
        np.abs(np.cumsum(x, axis=1, dtype=np.float64)).max(axis=1),
        np.abs(np.cumsum(y, axis=1, dtype=np.float64)).max(axis=1),
    )
    return np.abs(a.astype(np.float64) - b.astype(np.float64)), partial


@pytest.mark.parametrize("n", [16, 256, 4096])
@pytest.mark.parametrize("kind", ["zero_mean", "positive"])
def test_sum_tol_bounds_measured_float32_error_and_is_not_loose(n, kind):
    rng = np.random.default_rng(n)
    if kind == "zero_mean":  # dot-product-like: the partial sums are a random walk
        x = rng.standard_normal((TRIALS, n)).astype(np.float32)
    else:  # softmax-denominator-like: same-sign terms, partial sums <= the total
        x = rng.random((TRIALS, n)).astype(np.float32)
    diff, partial = _order_differences(x, rng)
    tol = np.array([fp32_sum_tol(n, m, sigmas=4) for m in partial])
    ratio = diff / tol
    assert diff.max() > 0, "the two orders never differed: the measurement is vacuous"
    assert ratio.max() <= 1, ratio.max()  # measured on this machine: 0.29 .. 0.44
    assert ratio.max() >= 1 / 20, ratio.max()  # not absurdly loose
    assert all(d <= sum_bound(n, m) for d, m in zip(diff, partial))  # the worst case, far more loosely


def test_constants_and_arguments():
    assert FP32_U == np.finfo(np.float32).eps / 2 and FP32_EPS == np.finfo(np.float32).eps
    assert BF16_EPS == 2.0**-7
    assert fp32_rel_tol(1024) == pytest.approx(4 * 2**-24 * np.sqrt(2 * 1024 / 3))
    assert sum_tol(10, 1.0, unit_roundoff=2**-8) == pytest.approx(2**16 * fp32_sum_tol(10, 1.0))
    with pytest.raises(ValueError, match="n_terms"):
        fp32_sum_tol(0, 1.0)


def test_adam_update_change_bounds_a_real_adamw_step():
    """Two AdamW runs (betas 0.9, 0.999, eps 1e-4) whose third gradient differs by a rounding-sized amount:
    the weights after the step differ by no more than the bound, and it is not absurdly loose in the case it
    is for: near-zero components, sqrt(v) << eps (where sqrt(v) >> eps the change is eps / sqrt(v) smaller)."""
    import torch

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(1000, generator=g, dtype=torch.float64)
    grads = [torch.randn(1000, generator=g, dtype=torch.float64) * 1e-6 for _ in range(3)]
    delta = torch.randn(1000, generator=g, dtype=torch.float64) * 1e-9
    out = []
    for d in (0.0, 1.0):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.01)
        for i, gr in enumerate(grads):
            w.grad = gr + (d * delta if i == 2 else 0)
            opt.step()
        out.append(w.detach().clone())
    dw = float((out[0] - out[1]).abs().max())
    bound = adam_update_change(1e-3, 1e-4, float(delta.abs().max()))
    assert 0 < dw <= bound and bound <= 100 * dw, (dw, bound)
