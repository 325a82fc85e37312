"""token_stats(inplace_backward=True) (issue 16, "Logits memory"): the backward writes the gradient into the
saved student logits' own storage. The gradient is checked against the float64 full-vocabulary reference of
tests/unit/test_vocab_parallel.py (the same derived tolerance) and bitwise against the default backward
(the same arithmetic, another destination), for every KL mode, temperatures, the one-distribution mode,
bf16, and several chunks and row blocks; the storage is really reused; leaves are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egrsd_megatron.ops.vocab_parallel import token_stats, token_stats_one
from tests.unit.test_vocab_parallel import KL_MODES, assert_within_derived, make_case, reference_stats

N, V_TOTAL, VOCAB = 45, 70, 64  # 6 padded columns; chunk 16 and 5-row blocks below: several of each


def _run(c: dict, kl, inplace: bool, dtype=torch.float32, **kw) -> dict:
    """token_stats on a NON-leaf copy of the student logits (as the trainer's gathered response logits);
    returns the statistics, the gradient reaching that copy, and whether it lives in the copy's storage."""
    leaf = c["zs"].to(dtype).clone().requires_grad_(True)
    zs = leaf * 1  # a fresh non-leaf tensor that only this call reads
    seen = {}
    zs.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    ptr = zs.data_ptr()
    st = token_stats(
        zs,
        c["zt"].to(dtype),
        c["y"],
        vocab_size=c["vocab_size"],
        chunk_size=16,
        block_elems=5 * VOCAB,
        student_entropy=True,
        kl=kl,
        inplace_backward=inplace,
        **kw,
    )
    w = c["w"]
    loss = (w[0] * st.student_logprob).sum() + (w[1] * st.student_entropy).sum()
    if kl is not None:
        loss = loss + (w[2] * st.kl).sum()
    loss.backward()
    out = {
        "ls": st.student_logprob,
        "lt": st.teacher_logprob,
        "ht": st.teacher_entropy,
        "hs": st.student_entropy,
        "kl": st.kl if kl is not None else torch.zeros_like(st.student_logprob),
        "grad": leaf.grad,
    }
    out = {k: v.detach().double().numpy() for k, v in out.items()}
    out["reused"] = seen["ptr"] == ptr
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("kl", KL_MODES, ids=str)
def test_inplace_gradient_matches_float64_and_the_default(kl, temperature):
    c = make_case(3, N, V_TOTAL, VOCAB)
    ours = _run(c, kl, True, temperature=temperature)
    default = _run(c, kl, False, temperature=temperature)
    assert ours["reused"] and not default["reused"]  # the gradient took the logits' storage (and only then)
    for k in ("ls", "lt", "ht", "hs", "kl", "grad"):
        assert np.array_equal(ours[k], default[k]), k  # same arithmetic: bitwise
    ref = reference_stats(c["zs"], c["zt"], c["y"], c["w"], VOCAB, kl, temperature)
    assert_within_derived(ours, ref, c["w"], VOCAB, temperature, f"inplace kl={kl} T={temperature}")
    assert np.all(ours["grad"][:, VOCAB:] == 0)  # padded columns: no gradient (they held 1e30 before)


def test_inplace_bf16_is_bitwise_the_default():
    c = make_case(4, N, V_TOTAL, VOCAB)
    ours, default = _run(c, "reverse", True, torch.bfloat16), _run(c, "reverse", False, torch.bfloat16)
    assert ours["reused"] and np.array_equal(ours["grad"], default["grad"])


@pytest.mark.parametrize("entropy", [False, True])
def test_one_distribution_mode_inplace(entropy):
    c = make_case(5, N, V_TOTAL, VOCAB)
    grads = []
    for inplace in (True, False):
        leaf = c["zs"].clone().requires_grad_(True)
        z = leaf * 1
        ptr, seen = z.data_ptr(), {}
        z.register_hook(lambda g, seen=seen: seen.update(ptr=g.data_ptr()))
        st = token_stats_one(
            z, c["y"], vocab_size=VOCAB, chunk_size=16, block_elems=5 * VOCAB, entropy=entropy, inplace_backward=inplace
        )
        (c["w"][0] * st.logprob).sum().backward()
        assert (seen["ptr"] == ptr) == inplace
        grads.append(leaf.grad.double().numpy())
    assert np.array_equal(grads[0], grads[1])
    ref = reference_stats(c["zs"], c["zt"], c["y"], c["w"] * torch.tensor([[1.0], [0.0], [0.0]]), VOCAB, None)
    # log-prob only: assert_within_derived's bound with |w1| = |w2| = 0
    mag = 1.0 + np.log(VOCAB) + np.abs(ref["ls"])
    tol = 4 * float(torch.finfo(torch.float32).eps) * VOCAB * mag * np.abs(c["w"][0].double().numpy())
    assert np.all(np.abs(grads[0] - ref["grad"]).max(axis=1) <= tol)


def test_inplace_refuses_a_leaf_and_a_second_backward_is_loud():
    c = make_case(6, 8, V_TOTAL, VOCAB)
    leaf = c["zs"][:8].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward=True.*leaf"):
        token_stats(leaf, c["zt"][:8], c["y"][:8], vocab_size=VOCAB, inplace_backward=True)
    z = leaf * 1
    st = token_stats(z, c["zt"][:8], c["y"][:8], vocab_size=VOCAB, inplace_backward=True)
    st.student_logprob.sum().backward(retain_graph=True)
    # The saved logits now hold the gradient: autograd's version counter refuses to reuse them.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        st.student_logprob.sum().backward()
