"""Per-token advantages of the family (all factors stop-gradient), dispatched through the loss registry:

    Ahat = spec.advantage(spec, inputs, cfg)     spec = losses/registry.py:loss_spec(cfg.name)

    grpo / rlsd / egrsd / cl_egrsd:  Ahat_{i,t} = A_i * rho~_t * g_t      (reward_weighted.py)
    opsd:                            Ahat_t = lT_t - lS_t (signal=sampled), else 0   (opsd.py)

This module checks the caller's tensors against what the spec reads (advantages when it uses the reward,
log-probs per `spec.teacher_logprob(cfg)`, the entropy when it gates), masks them, and computes the
logging metrics; the formula of each loss lives in that loss's own file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import torch

from egrsd_megatron.losses._checks import as_mask, check_b, check_bt, compute_dtype
from egrsd_megatron.losses.factors import TokenInputs
from egrsd_megatron.losses.gate import entropy_gate, masked_quantile
from egrsd_megatron.losses.lookahead import lookahead_entropy
from egrsd_megatron.losses.registry import LossSpec, loss_spec

if TYPE_CHECKING:  # type hints only (config imports the loss registry, which imports this module)
    from egrsd_megatron.config.schema import LossConfig

# A token counts as "at the floor" when phi(H) <= this, i.e. its gate is within 5% of the gate's range
# above g_min (exp gate reaches g_min only at H = inf, so an exact test would never fire).
FLOOR_PHI = 0.05
# A "transient spike" is a token whose gate the lookahead lifts by at least half the gate's range.
SPIKE_LIFT = 0.5


def _zeros_masked(t: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # detach: every factor of Ahat is stop-gradient; where(): masked garbage (inf/nan) never enters math.
    t = t.detach().to(dtype)
    return torch.where(valid, t, torch.zeros_like(t))


def token_advantages(
    advantages: Optional[torch.Tensor],
    student_logprob: Optional[torch.Tensor],
    teacher_logprob: Optional[torch.Tensor],
    teacher_entropy: Optional[torch.Tensor],
    mask: torch.Tensor,
    cfg: LossConfig,
    *,
    vocab_size: Optional[int] = None,
    segment_ids: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, float]]]:
    """Ahat [B, T] (detached, 0 at masked positions) for `cfg.name`; see the module docstring.

    Needs (from the spec): advantages [B] when it uses the reward; student/teacher log-probs when
    `spec.teacher_logprob(cfg)` (rlsd, egrsd, cl_egrsd, opsd sampled); teacher_entropy when it gates
    (egrsd, cl_egrsd; optional otherwise: it feeds the metrics).
    `vocab_size` is |V| for the linear gate with h_ref=log_vocab; `segment_ids` [B, T] marks packed sequences.
    With `return_metrics=True` also returns python floats (see `_metrics`).
    """
    spec = loss_spec(cfg.name)
    valid = as_mask(mask)
    shape = valid.shape
    needs_lp = spec.teacher_logprob(cfg)
    why = f"for loss.name={cfg.name}"
    check_bt(student_logprob, "student_logprob", shape, required=needs_lp, why=why)
    check_bt(teacher_logprob, "teacher_logprob", shape, required=needs_lp, why=why)
    check_bt(teacher_entropy, "teacher_entropy", shape, required=spec.teacher_entropy, why=why)
    check_bt(segment_ids, "segment_ids", shape, required=False)
    if spec.uses_reward:
        check_b(advantages, "advantages", shape[0], why=why)
    dtype = compute_dtype(advantages, student_logprob, teacher_logprob, teacher_entropy)

    ls = _zeros_masked(student_logprob, valid, dtype) if student_logprob is not None else None
    lt = _zeros_masked(teacher_logprob, valid, dtype) if teacher_logprob is not None else None
    h = _zeros_masked(teacher_entropy, valid, dtype) if teacher_entropy is not None else None

    fac = spec.advantage(spec, TokenInputs(valid, advantages, ls, lt, h, vocab_size, segment_ids, dtype), cfg)
    a, rho_raw, rho, gate = fac.direction, fac.rho_raw, fac.rho, fac.gate
    adv_t = torch.where(valid, fac.adv, torch.zeros_like(fac.adv))
    if not return_metrics:
        return adv_t
    with torch.no_grad():
        metrics = _metrics(cfg, valid, a, rho_raw, rho, gate, h, vocab_size, segment_ids, spec)
    return adv_t, metrics


def _metrics(
    cfg: LossConfig,
    valid: torch.Tensor,
    a: Optional[torch.Tensor],
    rho_raw: torch.Tensor,
    rho: torch.Tensor,
    gate: torch.Tensor,
    h: Optional[torch.Tensor],
    vocab_size: Optional[int],
    segment_ids: Optional[torch.Tensor],
    spec: LossSpec,
) -> Dict[str, float]:
    """Logging metrics over valid tokens, as python floats (one host sync).

    gate_mean, gate_floor_frac (phi <= FLOOR_PHI); ratio_weight_mean and ratio_clip_frac over the
    live_tokens (tokens of sequences with A != 0; rho is 1 by definition where A = 0), with that count;
    with teacher_entropy: teacher_entropy_mean, teacher_entropy_p90 and spike_count (tokens whose gate the
    lookahead lifts by >= SPIKE_LIFT of the gate range, computed for every loss name). Means come with
    their counts so that a caller can combine micro-batches (trainer/metrics.py); the zero-advantage
    fraction is group_advantages's `zero_adv_group_frac`.
    """
    f = valid.to(gate.dtype)
    n = f.sum().clamp_min(1)
    names = ["gate_mean", "gate_floor_frac"]
    phi = (gate - cfg.gate.g_min) / (1 - cfg.gate.g_min)
    vals = [(gate * f).sum() / n, ((phi <= FLOOR_PHI) & valid).to(f.dtype).sum() / n]
    if a is not None:
        live = valid & (a != 0)
        nl = live.to(f.dtype).sum()
        eps_w = cfg.ratio.eps_w
        clipped = (rho_raw < 1 - eps_w) | (rho_raw > 1 + eps_w) if spec.ratio else torch.zeros_like(live)
        names += ["ratio_weight_mean", "ratio_clip_frac", "live_tokens"]
        vals += [
            torch.where(nl > 0, (rho * live).sum() / nl.clamp_min(1), torch.ones_like(nl)),
            (clipped & live).to(f.dtype).sum() / nl.clamp_min(1),
            nl,
        ]
    # spike_count needs the gate; a linear log_vocab gate without vocab_size (possible for grpo/rlsd,
    # which do not gate) cannot be evaluated, so the count is left out rather than guessed.
    gate_ok = not (cfg.gate.kind == "linear" and cfg.gate.h_ref == "log_vocab" and vocab_size is None)
    if h is not None:
        names += ["teacher_entropy_mean", "teacher_entropy_p90"]
        vals += [(h * f).sum() / n, masked_quantile(h, valid, 0.9)]
    if h is not None and gate_ok:
        # reuse the gate the loss already computed: it is one of the two (lifted for cl_egrsd, plain for egrsd)
        lifted = (
            gate
            if spec.lookahead
            else entropy_gate(
                lookahead_entropy(h, valid, cfg.lookahead.window, cfg.lookahead.stat, segment_ids=segment_ids),
                cfg.gate,
                mask=valid,
                vocab_size=vocab_size,
            )
        )
        plain = (
            gate if (spec.gate and not spec.lookahead) else entropy_gate(h, cfg.gate, mask=valid, vocab_size=vocab_size)
        )
        spikes = ((lifted - plain) >= SPIKE_LIFT * (1 - cfg.gate.g_min)) & valid
        names.append("spike_count")
        vals.append(spikes.to(f.dtype).sum())
    return dict(zip(names, torch.stack([v.to(f.dtype) for v in vals]).tolist()))
