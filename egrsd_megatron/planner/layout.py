"""The parallel layout of a run: TP x PP x DP over nodes x GPUs, and the divisibility rules it must meet.

Every rule that the trainer (or Megatron) would reject at start-up is checked here, before a job is
queued, with the numbers in the message: world size by TP x PP, heads / KV groups / FFN by TP (whole query
groups per TP rank), layers by PP, prompts per step by DP, rollouts per DP rank by the micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ConfigError, ExperimentConfig
from ..models.arch import ModelArch


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    rollouts_per_dp_rank: int       # train.prompts_per_step / DP x rollout.group_size
    num_microbatches: int           # rollouts_per_dp_rank / micro_batch_size

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def make_layout(cfg: ExperimentConfig, arch: ModelArch, nodes: int, gpus_per_node: int) -> Layout:
    """Layout from cfg.parallel on `nodes` x `gpus_per_node`; ConfigError when a size does not divide."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    tp, pp, mb = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.micro_batch_size
    world = nodes * gpus_per_node
    if world % (tp * pp):
        raise ConfigError(f"world size {nodes} nodes x {gpus_per_node} GPUs = {world} is not divisible by "
                          f"parallel.tp={tp} x parallel.pp={pp} = {tp * pp}")
    if tp > gpus_per_node:
        # TP all-reduces every layer: across nodes it would run over the network, not NVLink.
        raise ConfigError(f"parallel.tp={tp} is larger than --gpus-per-node={gpus_per_node}: tensor parallelism "
                          f"must stay inside one node (NVLink)")
    arch.check_parallel(tp, pp)
    dp = world // (tp * pp)
    prompts = cfg.train.prompts_per_step
    if prompts % dp:
        raise ConfigError(f"train.prompts_per_step={prompts} is not divisible by the data-parallel size "
                          f"DP={dp} (= {world} GPUs / (TP {tp} x PP {pp}))")
    per_rank = prompts // dp * cfg.rollout.group_size
    if per_rank % mb:
        raise ConfigError(f"parallel.micro_batch_size={mb} does not divide the {per_rank} rollouts per "
                          f"data-parallel rank (train.prompts_per_step {prompts} / DP {dp} x "
                          f"rollout.group_size {cfg.rollout.group_size})")
    return Layout(nodes=nodes, gpus_per_node=gpus_per_node, tp=tp, pp=pp, dp=dp, micro_batch_size=mb,
                  rollouts_per_dp_rank=per_rank, num_microbatches=per_rank // mb)
