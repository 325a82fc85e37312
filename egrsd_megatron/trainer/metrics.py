"""Metric reduction: every logged training metric has one explicit kind, and one function reduces them.

A rank's step produces `Record`s: one per micro-batch (from the student pass, last pipeline stage) and one
for its rollouts. A record holds scalars (a mean is that record's own mean; the count it is weighted by is
another scalar of the same record) and per-token values (for quantiles). `reduce_metrics` combines the
records of all micro-batches and all data-parallel ranks into the logged values:

    mean(w):       sum_r v_r w_r / sum_r w_r           (w = "tokens", "live_tokens", "signal_tokens": token-
                                                        weighted; "sequences", "groups": per rollout/group)
                   = the mean over the GLOBAL set of tokens / sequences, whatever the micro-batch split
    sum:           sum_r v_r                            (counts; the loss, already globally normalised)
    max:           max_r v_r
    quantile(x,q): the q-quantile of the per-token values x of ALL records (not a mean of per-record
                   quantiles), numpy's linear interpolation (losses.gate.masked_quantile)

so `spike_count`, `tokens` and `teacher_entropy_p90` do not depend on parallel.micro_batch_size or on the
data-parallel split. A key without a kind is an error: a new metric must say how it reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Sequence

import torch

from ..losses.gate import masked_quantile
from .rollouts import Rollouts


@dataclass(frozen=True)
class Kind:
    how: Literal["mean", "sum", "max", "quantile"]
    weight: str = ""  # mean: the scalar of the same record that weights it
    of: str = ""  # quantile: the per-token values it is taken over
    q: float = 0.0  # quantile: which one


SUM, MAX = Kind("sum"), Kind("max")


def mean(weight: str) -> Kind:
    return Kind("mean", weight=weight)


def quantile(of: str, q: float) -> Kind:
    return Kind("quantile", of=of, q=q)


TOKEN_MEAN, SEQ_MEAN = mean("tokens"), mean("sequences")

# Where each metric comes from: losses/token_weights.py (_metrics), losses/policy_loss.py, and the step's
# rollout record (rollout_record below).
KINDS: Dict[str, Kind] = {
    # counts
    "tokens": SUM,
    "live_tokens": SUM,
    "signal_tokens": SUM,
    "sequences": SUM,
    "groups": SUM,
    "spike_count": SUM,
    # each micro-batch's loss is divided by the global denominator already: the step's loss is their sum
    "loss": SUM,
    # token means over all valid tokens
    "gate_mean": TOKEN_MEAN,
    "gate_floor_frac": TOKEN_MEAN,
    "teacher_entropy_mean": TOKEN_MEAN,
    "ratio_mean": TOKEN_MEAN,
    "opsd_div_mean": TOKEN_MEAN,
    "kl_ref_mean": TOKEN_MEAN,
    # token means over the tokens of rollouts with A != 0 (token_weights) / with Ahat != 0 (policy_loss)
    "ratio_weight_mean": mean("live_tokens"),
    "ratio_clip_frac": mean("live_tokens"),
    "ppo_clip_frac": mean("signal_tokens"),
    # over the global token set
    "teacher_entropy_p90": quantile("teacher_entropy", 0.9),
    # per rollout / per group
    "accuracy": SEQ_MEAN,
    "response_length": SEQ_MEAN,
    "truncated_frac": SEQ_MEAN,
    "response_length_max": MAX,
    "zero_adv_group_frac": mean("groups"),
    # the rollout engine's vs the trainer's sampled-token log-probs (passes.engine_mismatch)
    "logprob_diff_mean": TOKEN_MEAN,
    "prob_ratio_error": TOKEN_MEAN,
    "logprob_diff_max": MAX,
    # micro-batches whose logits held a NaN/+inf (their loss is NaN: the step is skipped)
    "nonfinite_logits": SUM,
    # token positions each pass computed, padding included, and the padded share of them (batch.pass_token_metrics;
    # weighted by the computed tokens, the mean is 1 - real / computed over the step)
    "computed_tokens_student": SUM,
    "computed_tokens_teacher": SUM,
    "padding_frac_student": mean("computed_tokens_student"),
    "padding_frac_teacher": mean("computed_tokens_teacher"),
}


@dataclass
class Record:
    """One micro-batch's (or one rank's rollouts') metrics: scalars, and per-token values [n] (CPU)."""

    values: Dict[str, float]
    tokens: Dict[str, torch.Tensor] = field(default_factory=dict)


def rollout_record(rollouts: Rollouts, zero_adv_group_frac: float) -> Record:
    """This rank's rollout metrics: accuracy (mean reward), response length (mean, max), truncated fraction,
    and the fraction of groups whose advantages are all zero (losses.group_advantages's definition)."""
    lengths = [len(r.response) for r in rollouts.items]
    n = len(lengths)
    return Record(
        {
            "accuracy": float(rollouts.rewards().mean()),
            "response_length": sum(lengths) / n,
            "response_length_max": float(max(lengths)),
            "truncated_frac": sum(r.truncated for r in rollouts.items) / n,
            "sequences": float(n),
            "zero_adv_group_frac": zero_adv_group_frac,
            "groups": float(len({r.problem for r in rollouts.items})),
        }
    )


def _kind(name: str, kinds: Dict[str, Kind]) -> Kind:
    try:
        return kinds[name]
    except KeyError:
        raise KeyError(f"metric {name!r} has no reduction kind: add it to KINDS in trainer/metrics.py") from None


def reduce_metrics(ranks: Sequence[Sequence[Record]], kinds: Dict[str, Kind] = KINDS) -> Dict[str, float]:
    """The logged value of every metric from the records of each data-parallel rank (see the module docstring).

    Sums are taken per rank, then over ranks (the order the loss was always summed in). Means accumulate
    v * w in float64: the records' means are fp32 values, so v * w and the sums are exact or off by a
    float64 rounding, far below the fp32 rounding of each record's own mean (~eps32 relative). A mean
    whose weights are all 0 (e.g. no rollout with A != 0) is the plain mean of the records' values: each
    loss function defines that empty value itself (1 for ratio_weight_mean, 0 for the fractions).
    Per-record values of a quantile metric are not used: a mean of quantiles is not the quantile.
    """
    records = [r for rank in ranks for r in rank]
    names = sorted(
        {k for r in records for k in r.values}
        | {k for k, kd in kinds.items() if kd.how == "quantile" and any(kd.of in r.tokens for r in records)}
    )
    out: Dict[str, float] = {}
    for name in names:
        kind = _kind(name, kinds)
        if kind.how == "quantile":
            values = [r.tokens[kind.of].reshape(-1) for r in records if kind.of in r.tokens]
            out[name] = float(masked_quantile(torch.cat(values), None, kind.q))
            continue
        have = [[r for r in rank if name in r.values] for rank in ranks]
        if kind.how == "sum":
            out[name] = sum(sum(r.values[name] for r in rank) for rank in have)
        elif kind.how == "max":
            out[name] = max(r.values[name] for rank in have for r in rank)
        elif kind.how == "mean":
            lacking = [r for rank in have for r in rank if kind.weight not in r.values]
            if lacking:
                raise KeyError(
                    f"metric {name!r} is weighted by {kind.weight!r}, which its record lacks: "
                    f"{sorted(lacking[0].values)}"
                )
            num = sum(sum(r.values[name] * r.values[kind.weight] for r in rank) for rank in have)
            den = sum(sum(r.values[kind.weight] for r in rank) for rank in have)
            flat = [r.values[name] for rank in have for r in rank]
            out[name] = num / den if den > 0 else sum(flat) / len(flat)
        else:
            raise ValueError(f"metric {name!r}: unknown reduction {kind.how!r}")
    return out
