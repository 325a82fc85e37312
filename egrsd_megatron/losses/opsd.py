"""OPSD baseline (arXiv 2601.18734): reward-free on-policy self-distillation (docs/method.md 7).

    signal = sampled:     Ahat_t = sg(lT_t - lS_t), then the clipped surrogate of policy_loss.py
    signal = reverse_kl:  obj_t  = KL(pS || pT)_t over the full vocabulary, with gradient; Ahat = 0
    signal = jsd:         obj_t  = JSD_beta(pT, pS)_t;                                       Ahat = 0

The divergences come from `ops.vocab_parallel.token_stats(kl=divergence(cfg))`, which then needs the
teacher's full (vocab-sharded) logits rather than only its per-token statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from egrsd_megatron.losses.factors import Divergence, TokenFactors, TokenInputs

if TYPE_CHECKING:  # type hints only (config imports the registry, which imports this module)
    from egrsd_megatron.config.schema import LossConfig
    from egrsd_megatron.losses.registry import LossSpec


def uses_logprobs(cfg: LossConfig) -> bool:
    """The sampled signal reads lS and lT of the sampled tokens; the divergences read the logits instead."""
    return cfg.opsd.signal == "sampled"


def divergence(cfg: LossConfig) -> Divergence:
    """The per-token divergence token_stats must compute: None, "reverse" or ("jsd", beta)."""
    if cfg.opsd.signal == "sampled":
        return None
    return "reverse" if cfg.opsd.signal == "reverse_kl" else ("jsd", float(cfg.opsd.beta))


def opsd_advantages(spec: LossSpec, x: TokenInputs, cfg: LossConfig) -> TokenFactors:
    """sg(lT - lS) for the sampled signal; 0 for the divergences (their loss is the divergence itself)."""
    ones = x.ones()
    adv = (x.teacher_logprob - x.student_logprob) if uses_logprobs(cfg) else torch.zeros_like(ones)
    return TokenFactors(adv, None, ones, ones, ones)
