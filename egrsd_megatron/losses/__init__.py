"""The EGRSD loss family (docs/method.md): GRPO, RLSD, EGRSD, CL-EGRSD and OPSD in one module.

Pipeline per batch: rewards -> `group_advantages` [B] -> `token_advantages` [B, T] (A x ratio weight x
entropy gate, all stop-gradient) -> `policy_loss` (clipped surrogate, global normalizer). `loss.name`
selects a `LossSpec` (`FAMILY` in registry.py): its advantage function and what it reads. Only torch is
needed: no Megatron import here, and config (`LossConfig`) only for type hints.
"""

from egrsd_megatron.losses.advantages import group_advantages
from egrsd_megatron.losses.factors import TokenFactors, TokenInputs
from egrsd_megatron.losses.gate import entropy_gate, masked_quantile
from egrsd_megatron.losses.lookahead import lookahead_entropy
from egrsd_megatron.losses.policy_loss import policy_loss
from egrsd_megatron.losses.registry import (
    FAMILY,
    LossSpec,
    divergence_kind,
    loss_spec,
    reads_teacher,
    teacher_pass_needed,
    weight_copies,
)
from egrsd_megatron.losses.token_weights import token_advantages

__all__ = [
    "group_advantages",
    "lookahead_entropy",
    "entropy_gate",
    "masked_quantile",
    "token_advantages",
    "policy_loss",
    "FAMILY",
    "LossSpec",
    "loss_spec",
    "divergence_kind",
    "reads_teacher",
    "teacher_pass_needed",
    "weight_copies",
    "TokenInputs",
    "TokenFactors",
]
