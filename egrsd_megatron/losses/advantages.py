"""Group-relative advantages (GRPO style), shared by grpo / rlsd / egrsd / cl_egrsd.

    A_i = (R_i - mean_G R) / (std_G R + eps)      (normalize_std=True; std is the sample std, n-1,
                                                   as torch.std / TRL / verl compute it)
    A_i =  R_i - mean_G R                          (normalize_std=False)

Rollouts of one prompt are contiguous: rewards[g * G : (g + 1) * G] is group g.
A group whose rewards are all equal gets A = 0 exactly (set explicitly: R - mean of equal floats is not
always exactly 0 in floating point, and the property "no gradient from such a group" must hold exactly).
"""

from __future__ import annotations

from typing import Dict, Tuple, Union

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    *,
    eps: float = 1e-6,
    return_metrics: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, float]]]:
    """Per-sequence advantages [B] from rewards [B] in contiguous groups of `group_size`.

    With `return_metrics=True` also returns python floats: `zero_adv_group_frac` (groups with all-equal
    rewards, which give no gradient), `reward_mean`, `reward_std`.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards: expected a 1-D tensor [B], got {shape}")
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    b = rewards.numel()
    if b % group_size != 0:
        raise ValueError(
            f"rewards: {b} values do not split into groups of group_size={group_size}; "
            f"pass whole groups (B must be a multiple of the group size)"
        )
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten()[:5].tolist()
        raise ValueError(f"rewards: non-finite values at rows {bad}; the reward function must return finite numbers")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    constant = (r.max(dim=1).values == r.min(dim=1).values).unsqueeze(1)
    if normalize_std and group_size > 1:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    adv = torch.where(constant, torch.zeros_like(centered), centered).view(-1)
    if not return_metrics:
        return adv
    stats = torch.stack([constant.float().mean(), r.mean(), r.std() if b > 1 else r.new_zeros(())]).tolist()
    return adv, {"zero_adv_group_frac": stats[0], "reward_mean": stats[1], "reward_std": stats[2]}
