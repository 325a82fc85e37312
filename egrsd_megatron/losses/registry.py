"""The loss family as data: everything that depends on `loss.name` (docs/method.md, family table).

| name     | direction | ratio | gate    | lookahead | teacher log-probs | teacher entropy | full teacher logits |
| grpo     | A         | 1     | 1       | -         | no                | no              | no                  |
| rlsd     | A         | rho~  | 1       | -         | yes               | no              | no                  |
| egrsd    | A         | rho~  | g(H)    | -         | yes               | yes             | no                  |
| cl_egrsd | A         | rho~  | g(H^CL) | yes       | yes               | yes             | no                  |
| opsd     | none      | -     | -       | -         | signal=sampled    | no              | signal=reverse_kl/jsd |

`FAMILY` is the one list of loss names: config validation (`LossConfig.validate`), the trainer, the
planner and the docs all read it. Adding a loss = one file in losses/ with its advantage function, one
entry below, and its section in docs/method.md (docs/architecture.md, "Add a loss").

Layering: config imports this module (to validate `loss.name`), so the losses modules import config
only under TYPE_CHECKING, and ConfigError comes from the bottom-level utils/errors.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Tuple

from egrsd_megatron.losses import opsd
from egrsd_megatron.losses.factors import AdvantageFn, Divergence
from egrsd_megatron.losses.reward_weighted import reward_weighted_advantages
from egrsd_megatron.utils.errors import ConfigError

if TYPE_CHECKING:  # type hints only: config imports this module at runtime
    from egrsd_megatron.config.schema import LossConfig

ConfigFlag = Callable[["LossConfig"], bool]
DivergenceFn = Callable[["LossConfig"], Divergence]


def always(cfg: LossConfig) -> bool:
    return True


def never(cfg: LossConfig) -> bool:
    return False


def no_divergence(cfg: LossConfig) -> Divergence:
    return None


@dataclass(frozen=True)
class LossSpec:
    """One loss of the family: its token-advantage function and what it reads.

    The three signals of Ahat = A x rho~ x g are the flags `uses_reward` (direction), `ratio`
    (magnitude) and `gate` (+ `lookahead`); the inputs follow from them and from the loss's own section
    of `loss.*` (e.g. opsd's `loss.opsd.signal`), which is why those two are functions of the config.
    """

    name: str
    description: str
    advantage: AdvantageFn  # (spec, TokenInputs, cfg) -> TokenFactors: Ahat, in the loss's own file
    uses_reward: bool  # direction from the group-relative advantage A_i: needs rewards, G >= 2
    ratio: bool = False  # teacher/student likelihood-ratio magnitude rho~ (loss.ratio)
    gate: bool = False  # teacher-entropy confidence gate g (loss.gate); needs teacher entropy
    lookahead: bool = False  # the gate reads H^CL = min(H, F) instead of H (loss.lookahead)
    teacher_logprob: ConfigFlag = never  # needs lS and lT of the sampled tokens
    divergence: DivergenceFn = no_divergence  # needs the teacher's full distribution: token_stats(kl=...)

    @property
    def teacher_entropy(self) -> bool:
        """Needs the teacher entropy H per token (only the gate reads it; the metrics use it when given)."""
        return self.gate


FAMILY: Dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec(
            "grpo", "GRPO baseline: sequence advantage on every token", reward_weighted_advantages, uses_reward=True
        ),
        LossSpec(
            "rlsd",
            "RLSD baseline (arXiv 2604.03128): A x ratio weight",
            reward_weighted_advantages,
            uses_reward=True,
            ratio=True,
            teacher_logprob=always,
        ),
        LossSpec(
            "egrsd",
            "EGRSD: A x ratio weight x entropy gate",
            reward_weighted_advantages,
            uses_reward=True,
            ratio=True,
            gate=True,
            teacher_logprob=always,
        ),
        LossSpec(
            "cl_egrsd",
            "CL-EGRSD: EGRSD with the gate on the causal-lookahead entropy min(H, F)",
            reward_weighted_advantages,
            uses_reward=True,
            ratio=True,
            gate=True,
            lookahead=True,
            teacher_logprob=always,
        ),
        LossSpec(
            "opsd",
            "OPSD: reward-free self-distillation (sampled-token, reverse KL or JSD_beta)",
            opsd.opsd_advantages,
            uses_reward=False,
            teacher_logprob=opsd.uses_logprobs,
            divergence=opsd.divergence,
        ),
    )
}


def loss_spec(name: str) -> LossSpec:
    """The spec of `loss.name`; unknown names raise ConfigError listing the known ones."""
    try:
        return FAMILY[name]
    except KeyError:
        raise ConfigError(f"config key 'loss.name': got {name!r}; expected one of {', '.join(FAMILY)}") from None


def divergence_kind(cfg: LossConfig) -> Divergence:
    """What per-token divergence `cfg` needs from ops.vocab_parallel.token_stats(kl=...): its spec's
    `divergence(cfg)` (None, "reverse" or ("jsd", beta)). None also means the teacher's per-token
    statistics suffice, so its full logits need not be kept."""
    return loss_spec(cfg.name).divergence(cfg)


def reads_teacher(cfg: LossConfig) -> bool:
    """Whether the loss of `cfg` reads any teacher input (log-probs, entropy or a divergence). When it reads
    none (grpo), the trainer runs no teacher pass at all (unless teacher.log_entropy asks for its metrics)."""
    spec = loss_spec(cfg.name)
    return spec.teacher_logprob(cfg) or spec.teacher_entropy or spec.divergence(cfg) is not None


def teacher_pass_needed(cfg: LossConfig, log_entropy: bool) -> bool:
    """Whether a step runs a teacher pass: the loss reads a teacher input, or teacher.log_entropy asks for
    the teacher-entropy metrics of a loss that reads none (they never enter its loss)."""
    return reads_teacher(cfg) or log_entropy


def weight_copies(cfg: LossConfig, teacher_mode: str, log_entropy: bool) -> Tuple[bool, bool]:
    """(teacher copy, reference copy): the extra model instances a run holds beside the student.

    A frozen or sync teacher is a copy, but only when a teacher pass runs at all (grpo: none, so no copy).
    The k3 KL's reference (loss.kl_coef > 0) is the initial weights: the frozen teacher's copy when there is
    one, else a copy of its own. The trainer builds these and the planner counts them, both from here."""
    teacher = teacher_mode in ("frozen", "sync") and teacher_pass_needed(cfg, log_entropy)
    reference = cfg.kl_coef > 0 and not (teacher and teacher_mode == "frozen")
    return teacher, reference
