"""The records a loss's token-advantage function (`LossSpec.advantage`) reads and returns.

`token_weights.token_advantages` checks the caller's tensors against the spec, masks and detaches them into
a `TokenInputs`, calls `spec.advantage(spec, inputs, cfg)`, and masks the `TokenFactors.adv` it gets back.
The other factors only feed the logging metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Tuple, Union

import torch

if TYPE_CHECKING:  # type hints only: config imports losses.registry, so no runtime import of config here
    from egrsd_megatron.config.schema import LossConfig
    from egrsd_megatron.losses.registry import LossSpec

# What `ops.vocab_parallel.token_stats(kl=...)` computes per token: "reverse" = KL(pS||pT), or
# ("jsd", beta) = the generalized JSD_beta. None: the loss needs no full-distribution divergence.
Divergence = Optional[Union[str, Tuple[str, float]]]


@dataclass(frozen=True)
class TokenInputs:
    """Per-token inputs: [B, T], 0 outside `valid`, detached, in `dtype` (None where the caller gave none)."""

    valid: torch.Tensor  # [B, T] bool: the response tokens that are scored
    advantages: Optional[torch.Tensor]  # [B] group-relative A_i as given (losses with uses_reward)
    student_logprob: Optional[torch.Tensor]  # lS of the sampled tokens
    teacher_logprob: Optional[torch.Tensor]  # lT of the sampled tokens
    teacher_entropy: Optional[torch.Tensor]  # H over the full vocabulary
    vocab_size: Optional[int]  # |V|, for the linear gate's log_vocab reference
    segment_ids: Optional[torch.Tensor]  # [B, T] packed-sequence ids (lookahead boundaries)
    dtype: torch.dtype  # at least fp32

    def ones(self) -> torch.Tensor:
        return torch.ones(self.valid.shape, dtype=self.dtype, device=self.valid.device)


@dataclass(frozen=True)
class TokenFactors:
    """Ahat [B, T] and the factors it is made of (ones where a loss does not use one), for the metrics."""

    adv: torch.Tensor  # Ahat before masking
    direction: Optional[torch.Tensor]  # A_i broadcast to [B, T]; None for a reward-free loss
    rho_raw: torch.Tensor  # exp(sign(A) (lT - lS)) before the clip
    rho: torch.Tensor  # the ratio weight rho~
    gate: torch.Tensor  # the gate g


AdvantageFn = Callable[["LossSpec", TokenInputs, "LossConfig"], TokenFactors]
