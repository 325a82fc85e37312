"""CL-EGRSD causal lookahead: tell a transient entropy spike from a sustained high-entropy span.

    F_t    = stat_{j = 1..k} H_{t+j}    over the next k positions of the SAME response,
                                        truncated at its end; F_t = H_t where no such position exists
    H^CL_t = min(H_t, F_t)

"Same response" = the maximal run of consecutive valid (mask) positions that also share a `segment_id`.
The window stops at the first masked position or segment change, so it never reads past a response's
end, into padding, or into the next sequence of a packed row (nor across a masked hole inside one row:
a conservative choice for multi-turn masks).
"""

from __future__ import annotations

from typing import Optional

import torch

from egrsd_megatron.losses._checks import as_mask, check_bt


def lookahead_entropy(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    window: int = 8,
    stat: str = "mean",
    *,
    segment_ids: Optional[torch.Tensor] = None,
    return_future: bool = False,
) -> torch.Tensor:
    """H^CL = min(H, F) per token, [B, T]; 0 at masked positions. `return_future=True` returns F instead."""
    valid = as_mask(mask)
    check_bt(entropy, "entropy", valid.shape)
    check_bt(segment_ids, "segment_ids", valid.shape, required=False)
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if stat not in ("mean", "max"):
        raise ValueError(f"stat: got {stat!r}; expected mean or max")
    # Zero masked entries so garbage (nan/inf) there cannot leak into a neighbour's statistic.
    h = torch.where(valid, entropy, torch.zeros_like(entropy))
    t_len = h.shape[1]
    # link[:, s]: position s+1 continues the response that position s belongs to.
    link = valid[:, 1:] & valid[:, :-1]
    if segment_ids is not None:
        link = link & (segment_ids[:, 1:] == segment_ids[:, :-1])
    # cont[:, t] after step j: positions t..t+j all lie in one response. Looping over the k offsets keeps
    # it O(k B T) with no gather; k is small (default 8).
    cont = valid
    total = torch.zeros_like(h)
    count = torch.zeros_like(h)
    peak = torch.full_like(h, float("-inf"))
    for j in range(1, min(int(window), t_len - 1) + 1):
        nxt = torch.zeros_like(valid)
        nxt[:, : t_len - j] = cont[:, : t_len - j] & link[:, j - 1 :]
        cont = nxt
        hj = torch.zeros_like(h)
        hj[:, : t_len - j] = h[:, j:]
        total = total + torch.where(cont, hj, torch.zeros_like(hj))
        count = count + cont.to(h.dtype)
        peak = torch.where(cont, torch.maximum(peak, hj), peak)
    future = total / count.clamp_min(1) if stat == "mean" else peak
    future = torch.where(count > 0, future, h)
    if return_future:
        return torch.where(valid, future, torch.zeros_like(h))
    return torch.where(valid, torch.minimum(h, future), torch.zeros_like(h))
