"""Training checkpoints: model, optimizer, scheduler, every rank's RNG, data position, step.

Layout:
    <root>/step_00000010/
        model/                                            the weights, in megatron_format's layout (Megatron-LM
                                                          per-rank files + egrsd_checkpoint.json + tokenizer/):
                                                          `egrsd eval --model` and `egrsd convert megatron-to-hf
                                                          --ckpt` take this folder as it is
        optim/mp_rank_<tp:02d>[_<pp:03d>].pt              optimizer + scheduler (+ sync teacher) per model-parallel
                                                          shard, written by data-parallel rank 0; with
                                                          parallel.distributed_optimizer its "optimizer" holds
                                                          only the param groups (hyper-parameters) and
        optim/mp_rank_<tp:02d>[_<pp:03d>]_dp_<dp:03d>.pt  each data-parallel rank's ZeRO-1 shard of the Adam
                                                          states, keyed by global parameter index
        rng/rank_<global:05d>.pt                          python, numpy, torch, Megatron tracker RNG
        trainer_state.json                                step, data sampler position, counters, config
    <root>/latest                                         names the newest COMPLETE step folder
Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 renames it to `step_N`, then
rewrites `latest` (temp file + rename), then prunes to the last `keep_last`. A crash at any point
leaves `latest` naming a complete checkpoint.
Optimizer kinds: the full state and the ZeRO-1 shards use the same global parameter numbering, so a
checkpoint resumes with either `parallel.distributed_optimizer` setting and any data-parallel size (each
rank reads the shard files one at a time and keeps the states of the parameters it owns).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..utils import atomic_write_json, atomic_write_text
from ..utils.errors import MissingInputError
from .formats import load_checkpoint, save_checkpoint
from .megatron_format import TOKENIZER_DIR, mp_rank_dir
from .optimizer_state import is_sharded, owned_indices, param_groups_state, shard_state

STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> Dict[str, Any]:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def find_latest(root: str) -> Optional[str]:
    """The folder named by `root/latest`, or None. A tracker naming a missing folder is an error."""
    tracker = os.path.join(root, "latest")
    if not os.path.isfile(tracker):
        return None
    name = open(tracker).read().strip()
    path = os.path.join(root, name)
    if not STEP_RE.match(name) or not os.path.isdir(path):
        raise MissingInputError(
            f"{tracker} names {name!r}, which is not a complete checkpoint folder in {root}: "
            f"point train.resume at a step_XXXXXXXX folder or remove the tracker"
        )
    return path


def save_train_state(
    root: str,
    step: int,
    model: torch.nn.Module,
    arch,
    optimizer,
    scheduler,
    trainer_state: Dict[str, Any],
    keep_last: int,
    teacher: Optional[torch.nn.Module] = None,
    tokenizer=None,
) -> str:
    """Collective: every rank calls it. Returns the final step folder."""
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(os.path.join(tmp, "rng"))
        os.makedirs(os.path.join(tmp, "optim"))
    _barrier()
    model_dir = save_checkpoint(model, arch, os.path.join(tmp, "model"), extra_meta={"iteration": step})
    if rank == 0 and tokenizer is not None and not os.path.isdir(os.path.join(model_dir, TOKENIZER_DIR)):
        tokenizer.save_pretrained(os.path.join(model_dir, TOKENIZER_DIR))
    sharded = is_sharded(optimizer)
    if sharded:  # ZeRO-1: every data-parallel rank writes its own shard of the Adam states
        torch.save(
            {
                "state": shard_state(optimizer),
                "dp_rank": ps.get_data_parallel_rank(),
                "dp_size": ps.get_data_parallel_world_size(),
            },
            os.path.join(tmp, "optim", _shard_file(ps.get_data_parallel_rank())),
        )
    if ps.get_data_parallel_rank() == 0:
        payload = {
            "optimizer": param_groups_state(optimizer) if sharded else optimizer.state_dict(),
            "optimizer_shards": ps.get_data_parallel_world_size() if sharded else 0,
            "opt_param_scheduler": scheduler.state_dict(),
            "iteration": step,
        }
        if teacher is not None:
            payload["teacher"] = teacher.state_dict()
        torch.save(payload, os.path.join(tmp, "optim", _optim_file()))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), step_dir_name(step) + "\n")
        steps = sorted(n for n in os.listdir(root) if STEP_RE.match(n))
        for old in steps[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def _optim_file() -> str:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    return (
        mp_rank_dir(
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(),
        )
        + ".pt"
    )


def _shard_file(dp_rank: int) -> str:
    return _optim_file()[: -len(".pt")] + f"_dp_{dp_rank:03d}.pt"


def _optimizer_state(path: str, payload: Dict[str, Any], optimizer) -> Dict[str, Any]:
    """The optimizer state_dict to load on this rank: the full one, or the ZeRO-1 shards merged (keeping
    only the states this rank's optimizer owns when it is itself sharded)."""
    sd = payload["optimizer"]
    keep = owned_indices(optimizer) if is_sharded(optimizer) else None
    n = int(payload.get("optimizer_shards", 0))
    if n == 0:
        if keep is not None:
            sd = {**sd, "state": {i: st for i, st in sd["state"].items() if i in keep}}
        return sd
    state: Dict[int, Any] = {}
    for r in range(n):
        f = os.path.join(path, "optim", _shard_file(r))
        if not os.path.isfile(f):
            raise MissingInputError(
                f"{f} is missing: the checkpoint {path} was written with parallel.distributed_optimizer=true at "
                f"data-parallel size {n} and needs all {n} optimizer shard files; the checkpoint is incomplete "
                f"(resume from another step folder)"
            )
        shard = torch.load(f, map_location="cpu", weights_only=False)
        state.update({i: st for i, st in shard["state"].items() if keep is None or i in keep})
        del shard
    return {**sd, "state": state}


def load_train_state(
    path: str, model: torch.nn.Module, arch, optimizer, scheduler, teacher: Optional[torch.nn.Module] = None
) -> Dict[str, Any]:
    """Restore this rank's model shard, optimizer, scheduler and RNG; return trainer_state.json.

    The checkpoint must have been written at the same TP x PP (optimizer states are per model shard).
    The data-parallel size and `parallel.distributed_optimizer` may differ from the run that wrote it.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    file = os.path.join(path, "optim", _optim_file())
    if not os.path.isfile(file):
        raise MissingInputError(
            f"{file} is missing: the checkpoint {path} was written with a different "
            f"tensor/pipeline parallel layout (resume at the same parallel.tp / parallel.pp)"
        )
    payload = torch.load(file, map_location="cpu", weights_only=False)
    load_checkpoint(model, arch, os.path.join(path, "model"))
    optimizer.load_state_dict(_optimizer_state(path, payload, optimizer))
    if is_sharded(optimizer):
        # ZeroRedundancyOptimizer.load_state_dict also keeps a dtype-cast copy of this rank's states in the
        # wrapper's own `state`, which nothing reads (steps and shard_state use the local optimizer's):
        # free it rather than hold this rank's Adam states (and fp32 masters) twice.
        optimizer.state.clear()
    scheduler.load_state_dict(payload["opt_param_scheduler"])
    if teacher is not None and "teacher" in payload:
        teacher.load_state_dict(payload["teacher"])
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
