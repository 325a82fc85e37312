"""Input checks shared by the loss functions: a bad tensor fails with its name and what to do."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def as_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return `mask` as a [B, T] bool tensor (nonzero = valid response token)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape [B, T], got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{name}: expected shape [B, T], got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_bt(
    t: Optional[torch.Tensor], name: str, shape: Tuple[int, int], required: bool = True, why: str = ""
) -> None:
    """Check that the per-token tensor `t` has the mask's [B, T] shape (or is absent when optional)."""
    if t is None:
        if required:
            raise ValueError(f"{name} is required{(' ' + why) if why else ''}; pass a [B, T] tensor")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {tuple(shape)}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the mask's [B, T]), got {tuple(t.shape)}")


def check_b(t: Optional[torch.Tensor], name: str, batch: int, why: str = "") -> None:
    """Check a per-sequence [B] tensor."""
    if t is None:
        raise ValueError(f"{name} is required{(' ' + why) if why else ''}; pass a [B] tensor")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({batch},), got {type(t).__name__}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sequence), got {tuple(t.shape)}")


def compute_dtype(*ts: Optional[torch.Tensor]) -> torch.dtype:
    """At least fp32: bf16 log-probs are upcast so exp/clip/min happen in fp32 (float64 stays float64)."""
    dt = torch.float32
    for t in ts:
        if t is not None and t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    return dt
