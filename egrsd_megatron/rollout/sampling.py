"""Next-token selection from logits: temperature, top-k, top-p, one random stream per row.

Written by hand (not `model.generate`) because every row must draw from its own `torch.Generator`:
Hugging Face's sampler uses one global stream per batch, so a row's tokens would depend on its batch
mates and on sub-batching, and an interrupted evaluation could not be resumed reproducibly.
The filtering order (temperature, then top-k, then top-p over the renormalised remainder) is the one
vLLM and Hugging Face use.
"""
from __future__ import annotations

from typing import List

import torch

from .base import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scaled logits [B, V] with the tokens outside top-k / the top-p nucleus set to -inf."""
    x = logits.float() / params.temperature
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


def select_next(logits: torch.Tensor, params: SamplingParams, generators: List[torch.Generator]) -> torch.Tensor:
    """Token ids [B] from logits [B, V]: argmax when greedy, else a draw from each row's generator."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i, g in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out
