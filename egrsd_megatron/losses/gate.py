"""Teacher-entropy confidence gate (EGRSD):

    g_t = g_min + (1 - g_min) * phi(H_t)
    phi(H) = exp(-H / tau)                       kind = exp (default, tau = 1 nat)
    phi(H) = clamp(1 - H / H_ref, 0, 1)          kind = linear, H_ref = log|V| or the batch q-quantile of H

so g is in [g_min, 1]: high-entropy (unsure) teacher positions are down-weighted, never zeroed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch

from egrsd_megatron.losses._checks import as_mask, check_bt

if TYPE_CHECKING:  # type hints only (config imports the loss registry, which imports this module)
    from egrsd_megatron.config.schema import GateConfig


def masked_quantile(values: torch.Tensor, mask: Optional[torch.Tensor], q: float) -> torch.Tensor:
    """q-quantile of values[mask] with linear interpolation (numpy's default); 0-dim tensor.

    By hand because torch.quantile refuses inputs over 2**24 elements (a long-context batch has more);
    two kthvalue selections are O(n) where a full sort is O(n log n) (about 2x faster than torch.sort at 64k
    tokens on CPU).
    An empty selection gives 0.
    """
    v = (values[mask] if mask is not None else values).reshape(-1)
    if v.numel() == 0:
        return values.new_zeros(())
    pos = q * (v.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    v_lo = torch.kthvalue(v, lo + 1).values  # kthvalue counts from 1
    v_hi = torch.kthvalue(v, hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def gate_reference(
    entropy: torch.Tensor, cfg: GateConfig, *, mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None
) -> Optional[torch.Tensor]:
    """H_ref of the linear gate (None for kind=exp)."""
    if cfg.kind != "linear":
        return None
    if cfg.h_ref == "log_vocab":
        if vocab_size is None or vocab_size < 2:
            raise ValueError(
                "entropy_gate: loss.gate.kind=linear with loss.gate.h_ref=log_vocab needs "
                f"vocab_size=<|V|> (>= 2), got {vocab_size!r}"
            )
        return entropy.new_tensor(math.log(vocab_size))
    q = float(cfg.h_ref.split(":", 1)[1])
    return masked_quantile(entropy, as_mask(mask) if mask is not None else None, q)


def entropy_gate(
    entropy: torch.Tensor, cfg: GateConfig, *, mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """g(H) in [g_min, 1], same shape as `entropy` ([B, T]); `cfg` is the `loss.gate` section.

    `mask` selects the tokens of the batch quantile (h_ref=quantile:<q>); `vocab_size` is |V| for
    h_ref=log_vocab. Both matter only for kind=linear.
    """
    if mask is not None:
        check_bt(entropy, "entropy", as_mask(mask).shape)
    # Entropies from fp32 sums can come out a hair below 0; clamp so phi <= 1 and g <= 1 exactly.
    h = entropy.clamp_min(0)
    if cfg.kind == "exp":
        phi = torch.exp(-h / cfg.tau)
    else:
        h_ref = gate_reference(h, cfg, mask=mask, vocab_size=vocab_size)
        # A zero reference (every valid token certain) means every token is confident: phi = 1 there.
        phi = torch.clamp(1 - h / h_ref.clamp_min(torch.finfo(h.dtype).tiny), 0, 1)
    return cfg.g_min + (1 - cfg.g_min) * phi
