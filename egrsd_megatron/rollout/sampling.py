"""Next-token selection from logits: temperature, top-k, top-p, one random stream per row.

Written by hand (not `model.generate`) because every row must draw from its own `torch.Generator`:
Hugging Face's sampler uses one global stream per batch, so a row's tokens would depend on its batch
mates and on sub-batching, and an interrupted evaluation could not be resumed reproducibly.
The filtering order (temperature, then top-k, then top-p over the renormalised remainder) is the one
vLLM and Hugging Face use.

`check_training_sampling` is the trainer's guard: it refuses settings under which the trainer's log-probs
(token_stats of softmax(z / T) over the FULL vocabulary) would not be those of the distribution the rollouts
were drawn from, or under which a group's G rollouts are all identical.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch

from ..config.schema import ConfigError
from .base import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scaled logits [B, V] with the tokens outside top-k / the top-p nucleus set to -inf."""
    x = logits.float()
    # x / 1.0 == x exactly (IEEE), so T = 1 skips a pass over [B, V] without changing a bit.
    if params.temperature != 1.0:
        x = x / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass BEFORE it already reaches top_p; the most likely token always stays.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [B]: per row the first v with cdf_v > u * cdf_V (cdf of probs [B, V] in float64, u [B] in
    [0, 1)), clamped to the row's last token of positive probability (u * cdf_V may round up to cdf_V)."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    last_positive = probs.shape[-1] - 1 - torch.argmax(torch.flip(probs > 0, dims=[-1]).to(torch.uint8), dim=-1)
    return torch.minimum(tok, last_positive)


def select_next(
    logits: torch.Tensor, params: SamplingParams, generators: List[torch.Generator]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B], their fp32 log-probs [B]) from logits [B, V]: argmax when greedy, else a draw from
    each row's generator.

    The log-prob is of the distribution sampled from: log softmax(filter_logits(z)) = log softmax(z / T)
    restricted to the top-k / top-p survivors and renormalised over them. Greedy: log softmax(z) (T = 1, no
    truncation) at the argmax, the convention vLLM's processed logprobs follow for a greedy request.

    The draw is inverse-CDF sampling with one uniform per row from the row's generator: token = the first v
    with cdf_v > u * cdf_V, cdf in float64 (its rounding, <= V * 2^-53 relative, is far below any token's
    probability that matters), u ~ U[0, 1). A token of probability 0 (filtered out) is never drawn: its cdf
    step is empty, and rounding at the top end is clamped to the last token of positive probability. Why not
    `torch.multinomial` (an exponential race, `argmax p / q` with q ~ Exp(1)): it draws V exponentials per
    row and token (~8% of a CPU decode step of SmolLM2, V = 49152, in torch's profiler); this draws one
    number. Rows stay independent of their batch mates and of sub-batching (each consumes its own
    generator, one double per token).
    """
    if params.greedy:
        tok = torch.argmax(logits, dim=-1)
        return tok, torch.log_softmax(logits.float(), dim=-1).gather(1, tok[:, None]).squeeze(1)
    if len(generators) != logits.shape[0]:
        raise ValueError(f"select_next: {len(generators)} generators for {logits.shape[0]} rows: pass one per row")
    x = filter_logits(logits, params)
    probs = torch.softmax(x, dim=-1)
    u = torch.stack([torch.rand((), dtype=torch.float64, generator=g, device=g.device) for g in generators])
    out = inverse_cdf(probs, u.to(probs.device))
    lp = torch.log_softmax(x, dim=-1).gather(1, out[:, None]).squeeze(1)
    # NaN logits (or a row whose every logit is -inf) give NaN probabilities, from which the search would
    # silently return some token: the drawn token's log-prob is NaN exactly then.
    if bool(torch.isnan(lp).any()):
        rows = torch.nonzero(torch.isnan(lp)).flatten().tolist()
        raise ValueError(
            f"select_next: rows {rows} have no valid sampling distribution (NaN/inf logits, or every token "
            f"filtered out); check the model outputs"
        )
    return out, lp


def check_training_sampling(rollout_cfg: Any) -> None:
    """Raise ConfigError (naming the key) for rollout settings training must not run with.

    - rollout.temperature == 0: greedy decoding makes all G rollouts of a group identical (zero
      group-relative advantage) and has no sampling distribution whose log-prob the update could use.
    - rollout.top_p < 1 / rollout.top_k > 0: the rollouts would be drawn from a truncated, renormalised
      distribution, while the trainer's log-probs (student, teacher, reference, old; token_stats) are of the
      full softmax(z / T); the ratio and the gradient would be of another policy (off-policy). Refused rather
      than emulated: the truncation set depends on the exact logits of the rollout engine (bf16 vLLM vs the
      trainer), so trainer-side truncation would not reproduce it token for token. Evaluation may use both.
    """
    t = float(rollout_cfg.temperature)
    if t == 0:
        raise ConfigError(
            "config key 'rollout.temperature': 0 (greedy) is not allowed in training: all "
            "rollout.group_size rollouts of a prompt would be identical (no group-relative signal) "
            "and there is no sampling distribution to score; use a temperature > 0 (e.g. 1.0). "
            "Greedy evaluation is set in the eval config, not here"
        )
    if float(rollout_cfg.top_p) < 1.0:
        raise ConfigError(
            f"config key 'rollout.top_p': {rollout_cfg.top_p} < 1 is not allowed in training: the "
            f"trainer's log-probs are of the full softmax(logits / rollout.temperature), so rollouts "
            f"drawn from the top-p nucleus would be off-policy; set rollout.top_p=1.0 (evaluation may "
            f"still use top-p)"
        )
    if int(rollout_cfg.top_k) > 0:
        raise ConfigError(
            f"config key 'rollout.top_k': {rollout_cfg.top_k} > 0 is not allowed in training: the "
            f"trainer's log-probs are of the full softmax(logits / rollout.temperature), so rollouts "
            f"drawn from the top-k tokens would be off-policy; set rollout.top_k=0 (evaluation may "
            f"still use top-k)"
        )
