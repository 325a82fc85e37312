"""Losses from `token_stats` on TP-sharded logits: loss and logit gradients equal at TP = 1 and TP = 2,
and both equal a float64 full-vocabulary reference (torch log_softmax + autograd).

One spawn of 2 gloo ranks runs every case at TP = 1 (group=None, full vocabulary, in-process) and at
TP = 2 (each rank its half of the vocabulary), so the spawn cost (~5-8 s) is paid once.
"""
from __future__ import annotations

import numpy as np
import torch

from egrsd_megatron.config import load_config
from egrsd_megatron.losses import divergence_kind, group_advantages, policy_loss, token_advantages
from egrsd_megatron.testing.spawn import run_distributed

B, T, V_PADDED, VOCAB, GROUP = 6, 9, 16, 15, 2   # last logit column is Megatron-style vocab padding
CASES = [   # loss.* overrides
    {"name": "egrsd"},
    {"name": "egrsd", "gate.kind": "linear", "gate.h_ref": "log_vocab", "aggregation": "seq_mean_token_mean"},
    {"name": "cl_egrsd", "lookahead.window": 3},
    {"name": "cl_egrsd", "lookahead.stat": "max", "gate.kind": "linear", "gate.h_ref": "quantile:0.7",
     "kl_coef": 0.1},
    {"name": "opsd", "opsd.signal": "reverse_kl"},
    {"name": "opsd", "opsd.signal": "jsd", "opsd.beta": 0.3},
]


def _cfg(kw):
    return load_config(None, [f"loss.{k}={v}" for k, v in kw.items()]).loss


def _inputs():
    g = torch.Generator().manual_seed(1234)
    student = torch.randn(B, T, V_PADDED, generator=g) * 2
    teacher = torch.randn(B, T, V_PADDED, generator=g) * 2
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([9, 5, 7, 1, 8, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    old_shift = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3  # puts some tokens in the PPO clip
    ref_shift = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2
    return student, teacher, targets, mask, rewards, old_shift, ref_shift


def _loss(cfg, ls, lt, h, kl, mask, rewards, old_shift, ref_shift):
    adv = group_advantages(rewards, GROUP, cfg.normalize_std) if cfg.spec.uses_reward else None
    old = (ls.detach().double() + old_shift) if cfg.name != "opsd" else None
    ta = token_advantages(adv, ls, lt, h, mask, cfg, vocab_size=VOCAB)
    loss, _ = policy_loss(ls, old, ta, mask, cfg, kl=kl, ref_logprob=ls.detach().double() + ref_shift)
    return loss


def _tp_worker(rank: int, world: int, cases):
    import torch.distributed as dist
    from egrsd_megatron.ops.vocab_parallel import token_stats

    student, teacher, targets, mask, rewards, old_shift, ref_shift = _inputs()
    v_local = V_PADDED // world
    out = []
    for kw in cases:
        cfg = _cfg(kw)
        res = {}
        for tag, group, lo, hi in (("tp1", None, 0, V_PADDED),
                                   ("tp2", dist.group.WORLD, rank * v_local, (rank + 1) * v_local)):
            s = student[..., lo:hi].clone().requires_grad_()
            st = token_stats(s, teacher[..., lo:hi], targets, group=group, vocab_size=VOCAB,
                             chunk_size=16, kl=divergence_kind(cfg))
            loss = _loss(cfg, st.student_logprob, st.teacher_logprob, st.teacher_entropy, st.kl, mask, rewards,
                         old_shift, ref_shift)
            loss.backward()
            res[tag] = (loss.detach(), s.grad)
        out.append(res)
    return out


def _reference(kw):
    """float64, full vocabulary (padding column dropped), autograd."""
    student, teacher, targets, mask, rewards, old_shift, ref_shift = _inputs()
    cfg = _cfg(kw)
    s = student.double().requires_grad_()
    log_ps = torch.log_softmax(s[..., :VOCAB], -1)
    log_pt = torch.log_softmax(teacher.double()[..., :VOCAB], -1)
    ls = log_ps.gather(-1, targets[..., None])[..., 0]
    lt = log_pt.gather(-1, targets[..., None])[..., 0]
    h = -(log_pt.exp() * log_pt).sum(-1)
    kl = None
    if divergence_kind(cfg) == "reverse":
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    elif divergence_kind(cfg) is not None:
        beta = cfg.opsd.beta
        log_m = torch.logsumexp(torch.stack([log_pt + np.log(beta), log_ps + np.log(1 - beta)]), 0)
        kl = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1)
    loss = _loss(cfg, ls, lt, h, kl, mask, rewards, old_shift, ref_shift)
    loss.backward()
    return float(loss.detach()), s.grad.numpy()


def test_loss_and_logit_gradient_equal_at_tp1_and_tp2():
    results = run_distributed(_tp_worker, 2, CASES, timeout=240)
    for i, kw in enumerate(CASES):
        ref_loss, ref_grad = _reference(kw)
        assert np.abs(ref_grad).max() > 1e-4, f"case {kw}: the reference gradient is zero (test would be vacuous)"
        tp1_loss, tp1_grad = results[0][i]["tp1"]
        tp2_loss = [results[r][i]["tp2"][0] for r in range(2)]
        tp2_grad = np.concatenate([results[r][i]["tp2"][1] for r in range(2)], axis=-1)
        # TP=1 vs TP=2 (same fp32 math, different reduction order): tight.
        assert float(tp2_loss[0]) == float(tp2_loss[1]), f"case {kw}: ranks disagree on the loss"
        np.testing.assert_allclose(float(tp2_loss[0]), float(tp1_loss), rtol=1e-5, atol=1e-7, err_msg=str(kw))
        np.testing.assert_allclose(tp2_grad, tp1_grad, rtol=1e-4, atol=1e-6, err_msg=str(kw))
        # both vs the float64 full-vocabulary reference; the padding column gets no gradient.
        np.testing.assert_allclose(float(tp1_loss), ref_loss, rtol=1e-4, atol=1e-6, err_msg=str(kw))
        np.testing.assert_allclose(tp1_grad, ref_grad, rtol=1e-3, atol=1e-6, err_msg=str(kw))
        assert (tp2_grad[..., VOCAB:] == 0).all()
