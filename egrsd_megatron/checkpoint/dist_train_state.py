"""torch_dist training checkpoints: model, Adam states and sync teacher in one `dist_checkpointing.save`.

Sharded state dict written into `step_N/model/` (dist_format.py's layout):
    model      GPTModel.sharded_state_dict()
    optimizer  {global parameter index: {state name: ShardedTensor}}, keys
               "optimizer.state.<exp_avg|exp_avg_sq|master>.<parameter key>", each with EXACTLY its
               parameter's sharding (so it reshards with it to any TP/PP)
    teacher    the sync teacher's GPTModel.sharded_state_dict(prefix="teacher.")
Megatron's helpers do the optimizer part as its own FP32Optimizer.sharded_state_dict does:
`get_param_id_to_sharded_param_map` (optimizer parameter index -> the model's ShardedTensor or, for
linear_fc1, ShardedTensorFactory, matched by tensor identity) and `optim_state_to_sharding_state`
(each state tensor -> a ShardedTensor/factory with the parameter's sharding, "step" excluded). Written by
hand, because the helpers assume what our torch optimizers do not give them:
- ZeRO-1 (torch ZeroRedundancyOptimizer): a data-parallel rank holds the states of the parameters it
  owns only, and is their only holder, but the helpers copy the parameter's replica_id, whose last
  component is the DP rank (Megatron marks DP rank 0 the main replica): an owner at DP rank 1 would
  save nothing. `_owner_replica` sets that component to 0 for the owned states.
- step: one count for every parameter (the trainer steps them together; Megatron-Core makes the same
  assumption, MegatronOptimizer._extract_common_per_param_step), checked equal on every rank at save and
  kept, with the param groups' hyper-parameters, in the small `optim/state.pt` (train_state.py).
- load: Megatron allocates its optimizer's states before loading (init_state_fn); torch's AdamW creates
  them lazily, so the template is built from the checkpoint's own metadata (which states were saved,
  in which dtype) and handed, as an ordinary optimizer state_dict keyed by global parameter index, to
  `optimizer.load_state_dict`: the same path as the torch format, so either optimizer kind and any
  data-parallel size resume it (ZeRO-1 ranks build templates for the parameters they own only).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..utils.errors import InputError
from .dist_format import (
    check_reshardable,
    fill_extra_state,
    model_template,
    read_dist_metadata,
    safe_dist_load,
    stored_tensors,
    write_model_metadata,
)
from .metadata import checkpoint_arch
from .optimizer_state import is_sharded, owned_indices, shard_state

STATE_FILE = "state.pt"  # optim/state.pt: param groups' hyper-parameters, the Adam step, the scheduler
STATE_PREFIX = "optimizer.state."
TEACHER_PREFIX = "teacher."

__all__ = ["STATE_FILE", "load_sharded", "optimizer_sharded_state", "save_sharded", "small_optimizer_state"]


def _params(optimizer) -> list:
    """Parameters in Optimizer.state_dict() numbering (the same for AdamW and ZeRO: optimizer_state.py)."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _owner_replica(sh: Any) -> Any:
    """`sh` with the data-parallel component of its replica_id (the last) set to 0: the ZeRO owner is main."""
    rid = sh.replica_id
    rid = (*rid[:-1], 0) if isinstance(rid, tuple) else 0
    return dataclasses.replace(sh, replica_id=rid)


def optimizer_sharded_state(model_sharded: Dict[str, Any], optimizer) -> Dict[int, Dict[str, Any]]:
    """This rank's Adam states (all, or the ZeRO-owned ones) as ShardedTensors sharded like their parameters."""
    # lazy: megatron.core takes seconds to import; plan/convert/eval import the checkpoint package
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    id_map = get_param_id_to_sharded_param_map(model_sharded, _params(optimizer))
    sd = {"state": shard_state(optimizer), "param_groups": []}
    optim_state_to_sharding_state(sd, id_map, exclude_keys=("step",))
    if is_sharded(optimizer):
        sd["state"] = {i: {k: _owner_replica(v) for k, v in st.items()} for i, st in sd["state"].items()}
    return sd["state"]


def _common_step(optimizer) -> Optional[float]:
    """Collective: the Adam step count shared by every parameter with state (None: no state yet)."""
    local = optimizer.optim if is_sharded(optimizer) else optimizer
    steps = {float(st["step"]) for st in local.state.values() if st and "step" in st}
    if len(steps) > 1:
        raise ValueError(f"the optimizer's step differs per parameter ({sorted(steps)}); torch_dist stores one")
    s = next(iter(steps)) if steps else None
    # [max, -min] over the ranks in one all-reduce; a rank without any state yet contributes -inf to both.
    t = torch.tensor([s, -s] if s is not None else [-math.inf, -math.inf], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = float(t[0]), -float(t[1])
    if hi == -math.inf:
        return None
    if hi != lo:
        raise ValueError(f"the optimizer's step differs across ranks ({lo} .. {hi}); torch_dist stores one")
    return hi


def small_optimizer_state(optimizer) -> Dict[str, Any]:
    """Collective: the TP/PP/DP-independent part of the optimizer (param groups without their parameter
    indices, the common step), what `optim/state.pt` holds next to the scheduler."""
    groups = torch.optim.Optimizer.state_dict(optimizer)["param_groups"]  # the wrapper's, for ZeRO too
    return {
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "step": _common_step(optimizer),
    }


def save_sharded(
    model_dir: str, model, arch, optimizer, teacher, step: int, tokenizer, async_save: bool = False
) -> Any:
    """Collective: write `model_dir` (the module docstring's state dict); returns dist_checkpointing.save's
    AsyncRequest when `async_save` (tensor writes pending), else None (everything written)."""
    # lazy: megatron.core takes seconds to import; plan/convert/eval import the checkpoint package
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(model_dir)
    dist.barrier()
    sharded: Dict[str, Any] = {"model": model.sharded_state_dict()}
    sharded["optimizer"] = optimizer_sharded_state(sharded["model"], optimizer)
    if teacher is not None:
        sharded["teacher"] = teacher.sharded_state_dict(prefix=TEACHER_PREFIX)
    request = dist_checkpointing.save(sharded, model_dir, async_sharded_save=async_save)
    if rank == 0:
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        extra = {"iteration": step, "world_size": dist.get_world_size(), "distributed_optimizer": is_sharded(optimizer)}
        write_model_metadata(model_dir, arch, tp, pp, next(model.parameters()).dtype, extra, tokenizer)
    return request


def _optimizer_template(model_sharded: Dict[str, Any], optimizer, stored: Dict[str, Any]) -> Dict[int, Dict]:
    """Empty ShardedTensors for the states this rank loads: every state name the checkpoint holds for each
    parameter (ZeRO: each owned parameter), in the stored dtype (fp32 masters and moments stay fp32)."""
    from megatron.core.dist_checkpointing.optimizer import (  # lazy: see optimizer_sharded_state
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
    )

    params = _params(optimizer)
    id_map = get_param_id_to_sharded_param_map(model_sharded, params)
    names = sorted({k[len(STATE_PREFIX) :].split(".", 1)[0] for k in stored if k.startswith(STATE_PREFIX)})
    keep = owned_indices(optimizer) if is_sharded(optimizer) else set(range(len(params)))
    out: Dict[int, Dict[str, Any]] = {}
    for i in sorted(keep):
        if i not in id_map:
            continue
        for name in names:
            key = f"{STATE_PREFIX}{name}.{id_map[i].key}"
            if key in stored:
                data = torch.zeros(params[i].shape, dtype=stored[key].properties.dtype, device=params[i].device)
                sh = make_sharded_optimizer_tensor(id_map[i], data, prefix=f"{STATE_PREFIX}{name}")
                out.setdefault(i, {})[name] = _owner_replica(sh) if is_sharded(optimizer) else sh
    return out


def load_sharded(model_dir: str, model, arch, optimizer, teacher, small: Dict[str, Any]) -> Dict[str, Any]:
    """Collective: load this rank's model shards (and the teacher's) at the CURRENT TP/PP and return the
    optimizer state_dict to hand to `optimizer.load_state_dict` (states resharded like their parameters)."""
    from megatron.core import parallel_state as ps  # lazy: see optimizer_sharded_state

    meta = read_dist_metadata(model_dir)
    checkpoint_arch(model_dir, meta, arch)
    check_reshardable(meta, arch, ps.get_tensor_model_parallel_world_size(), model_dir)
    stored = stored_tensors(model_dir)
    template: Dict[str, Any] = {"model": model_template(model)}
    template["optimizer"] = _optimizer_template(template["model"], optimizer, stored)
    with_teacher = teacher is not None and any(k.startswith(TEACHER_PREFIX) for k in stored)
    if with_teacher:
        template["teacher"] = model_template(teacher, prefix=TEACHER_PREFIX)
    loaded = safe_dist_load(template, model_dir)
    model.load_state_dict(fill_extra_state(model, loaded["model"]), strict=True)
    if with_teacher:  # its state-dict keys carry the prefix too
        own = {k[len(TEACHER_PREFIX) :]: v for k, v in loaded["teacher"].items()}
        teacher.load_state_dict(fill_extra_state(teacher, own), strict=True)
    step = small.get("step")
    state = {
        i: {**st, **({"step": torch.tensor(step, dtype=torch.float32)} if step is not None else {})}
        for i, st in loaded.get("optimizer", {}).items()
    }
    current = torch.optim.Optimizer.state_dict(optimizer)["param_groups"]
    saved = small["param_groups"]
    if len(saved) != len(current):
        raise InputError(
            f"{model_dir}: the checkpoint's optimizer has {len(saved)} parameter groups, this run's has "
            f"{len(current)} (a different optimizer configuration)"
        )
    return {"state": state, "param_groups": [{**s, "params": c["params"]} for s, c in zip(saved, current)]}
