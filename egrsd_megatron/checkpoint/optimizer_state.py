"""Optimizer state for checkpoints, for plain AdamW and ZeRO-1 alike (trainer/optim.py builds both).

Both are numbered the same way, `Optimizer.state_dict()`'s global parameter index (params in order over
the param groups), so `checkpoint.train_state` can write each data-parallel rank's shard and resume it
with either optimizer kind and any data-parallel size.
"""

from __future__ import annotations

from typing import Any, Dict, Set

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def is_sharded(opt: torch.optim.Optimizer) -> bool:
    return isinstance(opt, ZeroRedundancyOptimizer)


def _global_index(opt: torch.optim.Optimizer) -> Dict[torch.Tensor, int]:
    """Parameter -> index in `Optimizer.state_dict()` numbering (params in order over the param groups):
    the same numbering for AdamW and ZeroRedundancyOptimizer built from the same groups."""
    return {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}


def owned_indices(opt: torch.optim.Optimizer) -> Set[int]:
    """Global indices of the parameters whose Adam state this rank keeps (all of them unless sharded)."""
    index = _global_index(opt)
    groups = opt.optim.param_groups if is_sharded(opt) else opt.param_groups
    return {index[p] for g in groups for p in g["params"]}


def shard_state(opt: torch.optim.Optimizer) -> Dict[int, Dict[str, Any]]:
    """This rank's Adam states keyed by global index (the whole state for a non-sharded optimizer).
    Parameters that never got a gradient have no state yet (AdamW creates it at their first step)."""
    index = _global_index(opt)
    local = opt.optim if is_sharded(opt) else opt
    return {index[p]: dict(st) for p, st in local.state.items() if st}


def param_groups_state(opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """`Optimizer.state_dict()` without the per-parameter state: hyper-parameters (lr, betas, ...) and
    the global parameter indices of each group. For ZeroRedundancyOptimizer this does not need the
    collective `consolidate_state_dict()` that its own `state_dict()` requires."""
    sd = torch.optim.Optimizer.state_dict(opt)
    return {"state": {}, "param_groups": sd["param_groups"]}
