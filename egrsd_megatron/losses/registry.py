"""The loss family as data: which factors each `loss.name` uses (docs/method.md, family table).

| name     | direction | ratio | gate      | lookahead | reward |
| grpo     | A         | 1     | 1         | -         | yes    |
| rlsd     | A         | rho   | 1         | -         | yes    |
| egrsd    | A         | rho   | g(H)      | -         | yes    |
| cl_egrsd | A         | rho   | g(H^CL)   | yes       | yes    |
| opsd     | none      | -     | -         | -         | no     |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from egrsd_megatron.config.schema import ConfigError, LossConfig


@dataclass(frozen=True)
class LossSpec:
    """Which factors of Ahat = A * rho~ * g a loss uses."""
    name: str
    uses_reward: bool   # direction from the group-relative advantage A_i
    ratio: bool         # teacher/student likelihood-ratio magnitude rho~
    gate: bool          # teacher-entropy confidence gate g
    lookahead: bool     # the gate reads H^CL = min(H, F) instead of H
    description: str


FAMILY: Dict[str, LossSpec] = {
    "grpo": LossSpec("grpo", True, False, False, False, "GRPO baseline: sequence advantage on every token"),
    "rlsd": LossSpec("rlsd", True, True, False, False, "RLSD baseline (arXiv 2604.03128): A x ratio weight"),
    "egrsd": LossSpec("egrsd", True, True, True, False, "EGRSD: A x ratio weight x entropy gate"),
    "cl_egrsd": LossSpec("cl_egrsd", True, True, True, True,
                         "CL-EGRSD: EGRSD with the gate on the causal-lookahead entropy min(H, F)"),
    "opsd": LossSpec("opsd", False, False, False, False,
                     "OPSD: reward-free self-distillation (sampled-token, reverse KL or JSD_beta)"),
}


def loss_spec(name: str) -> LossSpec:
    """The spec of `loss.name`; unknown names raise ConfigError listing the known ones."""
    try:
        return FAMILY[name]
    except KeyError:
        raise ConfigError(f"config key 'loss.name': got {name!r}; expected one of {', '.join(FAMILY)}") from None


def divergence_kind(cfg: LossConfig) -> Optional[Union[str, Tuple[str, float]]]:
    """What per-token divergence `cfg` needs from ops.vocab_parallel.token_stats(kl=...):
    None, "reverse" (opsd reverse_kl: KL(pS||pT)) or ("jsd", beta) (opsd jsd: generalized JSD_beta)."""
    if cfg.name != "opsd" or cfg.signal == "sampled":
        return None
    return "reverse" if cfg.signal == "reverse_kl" else ("jsd", float(cfg.beta))
