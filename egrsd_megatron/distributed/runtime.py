"""The distributed runtime: one place that turns a launcher's environment into initialised groups.

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or Slurm srun (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST). nccl with CUDA,
gloo without. Megatron's parallel_state is initialised for TP x PP with DP = world / (TP x PP).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..compat import apply_cpu_backend, check_megatron_core_version
from ..config.schema import ConfigError
from ..utils.net import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: "node[01-04],other" -> "node01"; a plain name is returned as is.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.rstrip("]").split(",")[0].split("-")[0]
    return head


def _launcher(env: Mapping[str, str]) -> str:
    """Which launcher started this process: torchrun (wins), slurm (srun), or none."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "none"


def _env_world_size(env: Mapping[str, str]) -> int:
    """The launcher's world size (torchrun WORLD_SIZE, Slurm SLURM_NTASKS), 1 without a launcher: the one
    place it is read from the environment."""
    kind = _launcher(env)
    if kind == "torchrun":
        return int(env["WORLD_SIZE"])
    if kind == "slurm":
        return int(env["SLURM_NTASKS"])
    return 1


def world_size() -> int:
    """The number of processes of this run: the process group's when initialised, else the launcher's."""
    return dist.get_world_size() if dist.is_initialized() else _env_world_size(os.environ)


def launcher_env() -> dict:
    """rank / world_size / local_rank / master from torchrun's or Slurm's variables (torchrun wins)."""
    env = os.environ
    kind = _launcher(env)
    if kind == "torchrun":
        return {
            "rank": int(env["RANK"]),
            "world_size": _env_world_size(env),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": env.get("MASTER_PORT", "29500"),
        }
    if kind == "slurm":
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": _env_world_size(env),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "master_addr": env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            # A port derived from the job id: concurrent jobs sharing a node do not collide.
            "master_port": env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
        }
    # A single process without a launcher: any free local port (two such runs must not collide).
    return {
        "rank": 0,
        "world_size": 1,
        "local_rank": 0,
        "master_addr": "127.0.0.1",
        "master_port": env.get("MASTER_PORT") or str(free_port()),
    }


def check_layout(world: int, tp: int, pp: int, world_desc: Optional[str] = None) -> int:
    """Return DP = world / (TP x PP); ConfigError naming the numbers when `world` is not a multiple of
    TP x PP. `world_desc` replaces the bare number in the message (e.g. "4 nodes x 8 GPUs = 32")."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel.tp={tp} and parallel.pp={pp} must both be >= 1")
    if world % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_desc or world} is not divisible by parallel.tp={tp} x "
            f"parallel.pp={pp} = {tp * pp}: launch a multiple of {tp * pp} processes or change "
            f"parallel.tp / parallel.pp"
        )
    return world // (tp * pp)


def seed_everything(seed: int, rank_offset: int = 0) -> None:
    """Seed python, numpy and torch (and Megatron's model-parallel RNG tracker when initialised)."""
    s = seed + rank_offset
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        # Megatron seeds TP-rank-dependent streams (dropout, sharded init) off the same base seed.
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        torch.manual_seed(s)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed (if needed), the CPU backend (if no CUDA) and Megatron parallel_state."""
    check_megatron_core_version()  # on GPU too: names the installed and the supported versions
    use_cuda = torch.cuda.is_available()
    apply_cpu_backend()
    if not dist.is_initialized():
        env = launcher_env()
        check_layout(env["world_size"], tp, pp)
        os.environ.setdefault("MASTER_ADDR", env["master_addr"])
        os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
        if use_cuda:
            torch.cuda.set_device(env["local_rank"] % torch.cuda.device_count())
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=env["rank"],
            world_size=env["world_size"],
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, tp, pp)
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    info = parallel_info()
    # Same seed on every rank so replicated weights agree; Megatron forks per-TP-rank streams itself.
    seed_everything(seed)
    log.info(
        "rank %d/%d: tp %d/%d pp %d/%d dp %d/%d (%s)",
        rank,
        world,
        info.tp_rank,
        tp,
        info.pp_rank,
        pp,
        info.dp_rank,
        info.dp,
        info.backend,
    )
    return info


def parallel_info() -> DistInfo:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        backend=dist.get_backend() if dist.is_initialized() else "none",
    )


def teardown() -> None:
    """Destroy Megatron's groups and the default process group; safe to call twice."""
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
