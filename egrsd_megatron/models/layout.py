"""The parallel layout of a run: the one function that checks it (trainer, planner and eval all call it).

A run of `world` processes is split TP x PP x DP with DP = world / (TP x PP). The rules, each with the
numbers and the key in its message:
  world size divisible by TP x PP                       (distributed.runtime.check_layout)
  FFN by TP, layers by PP (KV groups / heads are padded) (ModelArch.check_parallel)
  train.prompts_per_step divisible by DP
  parallel.micro_batch_size divides the rollouts per DP rank = train.prompts_per_step / DP x rollout.group_size
    (unless parallel.max_tokens_per_micro_batch packs them instead; its budget is checked per step, by length)
The world size a process runs in is read in one place: `distributed.runtime.world_size()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config.schema import ConfigError, ExperimentConfig
from ..distributed.runtime import check_layout, world_size
from .arch import ModelArch

__all__ = ["ParallelLayout", "check_parallel_layout", "check_training_config", "world_size"]


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    rollouts_per_dp_rank: int  # train.prompts_per_step / DP x rollout.group_size
    num_microbatches: int  # rollouts_per_dp_rank / micro_batch_size


def check_parallel_layout(
    cfg: ExperimentConfig, arch: ModelArch, world: int, world_desc: Optional[str] = None
) -> ParallelLayout:
    """The layout of `cfg` on `world` processes; ConfigError naming the key and numbers when a size does not
    divide. `world_desc` says how the world size came about in messages (e.g. "2 nodes x 8 GPUs = 16")."""
    tp, pp, mb = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.micro_batch_size
    dp = check_layout(world, tp, pp, world_desc)
    arch.check_parallel(tp, pp, keys=("parallel.tp", "parallel.pp"))
    prompts = cfg.train.prompts_per_step
    if prompts % dp:
        raise ConfigError(
            f"train.prompts_per_step={prompts} must be divisible by the data-parallel size "
            f"DP={dp} (= world size {world_desc or world} / (TP {tp} x PP {pp}))"
        )
    per_rank = prompts // dp * cfg.rollout.group_size
    if per_rank % mb and not cfg.parallel.packing:  # packing (max_tokens_per_micro_batch) ignores micro_batch_size
        raise ConfigError(
            f"parallel.micro_batch_size={mb} does not divide the {per_rank} rollouts per "
            f"data-parallel rank (train.prompts_per_step {prompts} / DP {dp} x "
            f"rollout.group_size {cfg.rollout.group_size})"
        )
    return ParallelLayout(
        world_size=world,
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch_size=mb,
        rollouts_per_dp_rank=per_rank,
        num_microbatches=per_rank // mb,
    )


def check_training_config(cfg: ExperimentConfig, world: int, arch: ModelArch) -> int:
    """Every check a training run can fail before any work starts (the layout, then the training file);
    returns the data-parallel size."""
    dp = check_parallel_layout(cfg, arch, world).dp
    if not cfg.data.train_path:
        raise ConfigError(
            "data.train_path is not set: point it at a jsonl/parquet/datasets file "
            "(e.g. one made by `egrsd data synth`)"
        )
    if not os.path.exists(cfg.data.train_path):
        raise ConfigError(f"data.train_path={cfg.data.train_path} does not exist")
    return dp
