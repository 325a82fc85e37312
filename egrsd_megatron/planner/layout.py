"""The parallel layout of a planned run: TP x PP x DP over nodes x GPUs.

The divisibility rules are the trainer's own (models/layout.py: check_parallel_layout), checked here
before a job is queued; the planner adds the one rule only a cluster has: TP (the trainer's, and vLLM's
rollout.vllm_tp) stays inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ConfigError, ExperimentConfig
from ..models.arch import ModelArch
from ..models.layout import check_parallel_layout


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    rollouts_per_dp_rank: int  # train.prompts_per_step / DP x rollout.group_size
    num_microbatches: int  # rollouts_per_dp_rank / micro_batch_size

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def make_layout(cfg: ExperimentConfig, arch: ModelArch, nodes: int, gpus_per_node: int) -> Layout:
    """Layout from cfg.parallel on `nodes` x `gpus_per_node`; ConfigError when a size does not divide."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    tp = cfg.parallel.tp
    if tp > gpus_per_node:
        # TP all-reduces every layer: across nodes it would run over the network, not NVLink.
        raise ConfigError(
            f"parallel.tp={tp} is larger than --gpus-per-node={gpus_per_node}: tensor parallelism "
            f"must stay inside one node (NVLink)"
        )
    vtp = cfg.rollout.vllm_tp if cfg.rollout.engine == "vllm" else 1
    if gpus_per_node % vtp:
        # vLLM's TP groups are blocks of consecutive ranks: one that straddles two nodes all-reduces over the network.
        raise ConfigError(
            f"rollout.vllm_tp={vtp} does not divide --gpus-per-node={gpus_per_node}: vLLM tensor parallelism "
            f"must stay inside one node"
        )
    world = nodes * gpus_per_node
    lay = check_parallel_layout(cfg, arch, world, world_desc=f"{nodes} nodes x {gpus_per_node} GPUs = {world}")
    return Layout(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        tp=lay.tp,
        pp=lay.pp,
        dp=lay.dp,
        micro_batch_size=lay.micro_batch_size,
        rollouts_per_dp_rank=lay.rollouts_per_dp_rank,
        num_microbatches=lay.num_microbatches,
    )
