"""Ahat = A_i x rho~ x g: the token advantage of grpo, rlsd, egrsd and cl_egrsd (docs/method.md 2-5).

    rho_t      = clip(exp(sign(A_i) (lT_t - lS_t)), 1 - eps_w, 1 + eps_w)     (spec.ratio; else rho~ = 1)
    rho~_t     = (1 - lam) + lam rho_t
    g_t        = gate(H_t), or gate(min(H_t, F_t)) with spec.lookahead         (spec.gate; else g = 1)
    Ahat_{i,t} = A_i rho~_t g_t

rho~ and g are > 0, so sign(Ahat) = sign(A_i), and |rho~ g| lies in [g_min (1 - eps_w), 1 + eps_w].
Which factors a loss uses is data on its `LossSpec` (registry.py), not a branch on its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch

from egrsd_megatron.losses.factors import TokenFactors, TokenInputs
from egrsd_megatron.losses.gate import entropy_gate
from egrsd_megatron.losses.lookahead import lookahead_entropy

if TYPE_CHECKING:  # type hints only (config imports the registry, which imports this module)
    from egrsd_megatron.config.schema import LossConfig, RatioConfig
    from egrsd_megatron.losses.registry import LossSpec


def ratio_weight(
    a: torch.Tensor, student_logprob: torch.Tensor, teacher_logprob: torch.Tensor, cfg: RatioConfig
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rho_raw, rho~) per token: the reward-oriented teacher/student ratio, and its clipped mix with 1."""
    rho_raw = torch.exp(torch.sign(a) * (teacher_logprob - student_logprob))
    return rho_raw, (1 - cfg.lam) + cfg.lam * rho_raw.clamp(1 - cfg.eps_w, 1 + cfg.eps_w)


def reward_weighted_advantages(spec: LossSpec, x: TokenInputs, cfg: LossConfig) -> TokenFactors:
    """A_i rho~_t g_t with the factors `spec` switches on (module docstring)."""
    shape = x.valid.shape
    a = x.advantages.detach().to(x.dtype).unsqueeze(1).expand(shape)
    rho_raw = rho = gate = x.ones()
    if spec.ratio:
        rho_raw, rho = ratio_weight(a, x.student_logprob, x.teacher_logprob, cfg.ratio)
    if spec.gate:
        h = x.teacher_entropy
        if spec.lookahead:
            h = lookahead_entropy(h, x.valid, cfg.lookahead.window, cfg.lookahead.stat, segment_ids=x.segment_ids)
        gate = entropy_gate(h, cfg.gate, mask=x.valid, vocab_size=x.vocab_size)
    return TokenFactors(a * rho * gate, a, rho_raw, rho, gate)
