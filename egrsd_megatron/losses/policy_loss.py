"""The clipped policy-gradient objective of the family, with a global normalizer.

    r_t   = exp(lS_t - lS_old_t)
    pg_t  = - min(r_t Ahat_t, clip(r_t, 1 - eps_lo, 1 + eps_hi) Ahat_t)    (loss.clip; no divergence)
    pg_t  = D_t                     a divergence loss (LossSpec.divergence(cfg) is not None, e.g. opsd with
                                    signal=reverse_kl|jsd): D_t = KL(pS||pT) or JSD_beta at token t,
                                    a per-token tensor WITH gradient (ops.vocab_parallel.token_stats)
    k3_t  = exp(lref_t - lS_t) - (lref_t - lS_t) - 1                            (only when kl_coef > 0)
    obj_t = pg_t + kl_coef * k3_t

    token_mean:            L = sum_{i,t} m_{i,t} obj_{i,t} / D,   D = sum m (default)
    seq_mean_token_mean:   L = sum_i [sum_t m_{i,t} obj_{i,t} / |y_i|] / D,   D = #{i : |y_i| > 0} (default)

Passing `denominator` = the GLOBAL D (over all micro-batches and data-parallel ranks) makes the sum of the
per-micro-batch losses equal the global-batch loss, so gradients accumulate to the global mean.

Gradient w.r.t. lS_t (token_mean, kl_coef = 0, Ahat constant):
    dL/dlS_t = - m_t r_t Ahat_t / D   unless clipped [(Ahat > 0 and r > 1 + eps_hi) or (Ahat < 0 and
    r < 1 - eps_lo)], where it is 0; k3 adds kl_coef * m_t (1 - exp(lref_t - lS_t)) / D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import torch

from egrsd_megatron.losses._checks import as_mask, check_bt, compute_dtype
from egrsd_megatron.losses.registry import loss_spec

if TYPE_CHECKING:  # type hints only (config imports the loss registry, which imports this module)
    from egrsd_megatron.config.schema import LossConfig


def _masked(t: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # where() before any exp: a masked inf/nan would otherwise give nan gradients (0 * inf) in backward.
    t = t.to(dtype)
    return torch.where(valid, t, torch.zeros_like(t))


def policy_loss(
    student_logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    token_adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    denominator: Union[float, torch.Tensor, None] = None,
    kl: Optional[torch.Tensor] = None,
    ref_logprob: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Scalar loss (with gradient through student_logprob, and `kl` for opsd KL signals) and metrics.

    old_logprob: behaviour-policy log-probs [B, T]; None means on-policy (r = 1, old = sg(lS)).
    token_adv: Ahat [B, T] from `token_advantages` (treated as constant).
    denominator: global normalizer D (see module docstring); default: this call's own count.
    kl: per-token divergence [B, T] when the loss's spec has one (opsd reverse_kl|jsd).
    ref_logprob: [B, T] for kl_coef > 0.
    Metrics (python floats): loss, ratio_mean, ppo_clip_frac (valid tokens with Ahat != 0 whose clipped
    branch is active), tokens, signal_tokens (valid tokens with Ahat != 0: ppo_clip_frac's count), and
    kl_ref_mean / opsd_div_mean when those terms are on.
    """
    spec = loss_spec(cfg.name)
    valid = as_mask(mask)
    shape = valid.shape
    check_bt(student_logprob, "student_logprob", shape)
    check_bt(old_logprob, "old_logprob", shape, required=False)
    check_bt(token_adv, "token_adv", shape)
    kind = spec.divergence(cfg)
    divergence = kind is not None
    check_bt(
        kl,
        "kl",
        shape,
        required=divergence,
        why=f"for loss.name={cfg.name}, whose loss is the per-token divergence {kind!r} (from token_stats)",
    )
    check_bt(
        ref_logprob,
        "ref_logprob",
        shape,
        required=cfg.kl_coef > 0,
        why=f"when loss.kl_coef={cfg.kl_coef} > 0 (reference-policy log-probs)",
    )
    dtype = compute_dtype(student_logprob, old_logprob, token_adv, kl, ref_logprob)
    f = valid.to(dtype)

    ls = _masked(student_logprob, valid, dtype)
    metric_names, metric_vals = [], []
    if divergence:
        obj = _masked(kl, valid, dtype)
        ratio = torch.ones_like(ls)
        clipped = torch.zeros_like(valid)
        metric_names.append("opsd_div_mean")
        metric_vals.append(lambda: (obj.detach() * f).sum() / f.sum().clamp_min(1))
    else:
        old = _masked(old_logprob, valid, dtype).detach() if old_logprob is not None else ls.detach()
        adv = _masked(token_adv, valid, dtype).detach()
        ratio = torch.exp(ls - old)
        surrogate = ratio * adv
        surrogate_clipped = torch.clamp(ratio, 1 - cfg.clip.eps_lo, 1 + cfg.clip.eps_hi) * adv
        obj = -torch.minimum(surrogate, surrogate_clipped)
        with torch.no_grad():
            clipped = valid & (
                ((adv > 0) & (ratio > 1 + cfg.clip.eps_hi)) | ((adv < 0) & (ratio < 1 - cfg.clip.eps_lo))
            )
    if cfg.kl_coef > 0:
        log_ratio_ref = _masked(ref_logprob, valid, dtype).detach() - ls
        k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1
        obj = obj + cfg.kl_coef * k3
        metric_names.append("kl_ref_mean")
        metric_vals.append(lambda: (k3.detach() * f).sum() / f.sum().clamp_min(1))
    obj = torch.where(valid, obj, torch.zeros_like(obj))

    lengths = f.sum(dim=1)
    if cfg.aggregation == "token_mean":
        total = obj.sum()
        local_d = lengths.sum()
    else:  # seq_mean_token_mean
        total = (obj.sum(dim=1) / lengths.clamp_min(1)).sum()
        local_d = (lengths > 0).to(dtype).sum()
    if denominator is None:
        d = local_d.clamp_min(1)  # an all-masked micro-batch gives loss 0, not nan
    else:
        d = torch.as_tensor(denominator, dtype=dtype, device=ls.device)
        if d.numel() != 1 or not bool(d > 0):
            raise ValueError(
                f"denominator must be one positive number (the global token or sequence count), got {denominator!r}"
            )
    loss = total / d

    with torch.no_grad():
        n = f.sum().clamp_min(1)
        live = valid & (token_adv.detach() != 0)
        names = ["loss", "ratio_mean", "ppo_clip_frac", "tokens", "signal_tokens"] + metric_names
        vals = [
            loss.detach(),
            (ratio.detach() * f).sum() / n,
            clipped.to(dtype).sum() / live.to(dtype).sum().clamp_min(1),
            f.sum(),
            live.to(dtype).sum(),
        ]
        vals += [v() for v in metric_vals]
        metrics = dict(zip(names, torch.stack([v.to(dtype) for v in vals]).tolist()))
    return loss, metrics
