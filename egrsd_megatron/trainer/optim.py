"""AdamW with linear warmup + cosine decay, over this rank's parameter shards; optionally ZeRO-1.

Why torch AdamW rather than Megatron's optimizer here: Megatron's optimizer needs DDP-wrapped models
and CUDA tensors for its grad clipping; with gradients finalised by `distributed.grads` every rank
updates its own shards identically to what Megatron's (non-distributed) optimizer would compute, on CPU
and GPU alike.

`parallel.distributed_optimizer=true` (ZeRO-1): the Adam states (exp_avg, exp_avg_sq, step) are sharded
over the data-parallel group with `torch.distributed.optim.ZeroRedundancyOptimizer` wrapping the same
AdamW (same param groups, same decay split, foreach=False). Each DP rank owns whole parameters (torch
partitions them greedily by size, so each rank holds about 1/DP of the state elements), updates only
those, then broadcasts them to the other DP ranks. Gradients are still all-reduced in full by
`distributed.grads` (grad clipping and the non-finite check need the full gradient on every rank), so
only the optimizer-state memory shrinks, which is what ZeRO stage 1 is. The update of each parameter
is the same single-tensor AdamW arithmetic on the same gradient, so weights are bitwise identical to
the non-sharded optimizer (tests/distributed/test_zero.py).
Why not Megatron's DistributedOptimizer: it needs Megatron DDP's contiguous grad buffers (the trainer
finalises plain `.grad` itself) and its CUDA-only clip path. The collective it would need is not the
obstacle: with torch 2.13, gloo does run `dist.reduce_scatter_tensor` and `dist.all_gather_into_tensor`
(checked in a 2-process gloo run; both are flagged deprecated in favour of reduce_scatter_single /
all_gather_single). ZeroRedundancyOptimizer uses only broadcast, which every backend has.
bf16 parameters (model.params_dtype=bf16, the cluster configs) get `MasterWeightAdamW`: fp32 master
weights and moments in the optimizer state, so small updates are not rounded away.
Checkpoints: `checkpoint.train_state` saves each DP rank's shard, in the torch format with global
parameter indices (`checkpoint.optimizer_state`), in torch_dist as tensors sharded like their parameters
(`checkpoint.dist_train_state`), so a checkpoint resumes with either optimizer kind and any DP size
(torch_dist: any TP/PP too).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim.adam import adam  # torch's functional Adam(W): the arithmetic torch.optim.AdamW runs

from ..config import ConfigError, OptimConfig
from ..distributed.grads import grad_of


def build_optimizer(
    model_chunks: List[torch.nn.Module], cfg: OptimConfig, dp_group: Optional[Any] = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with `dp_group` (the data-parallel process group) ZeRO-1:
    a ZeroRedundancyOptimizer over that group, each rank keeping the AdamW state of its share."""
    decay, no_decay = [], []
    for m in model_chunks:
        for n, p in m.named_parameters():
            if not p.requires_grad:
                continue
            # Norm weights and biases are not decayed (standard for LLM fine-tuning).
            (no_decay if p.ndim == 1 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: identical update order on every backend keeps CPU resume bitwise reproducible.
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    dtypes = {p.dtype for g in groups for p in g["params"]}
    cls = torch.optim.AdamW if dtypes <= {torch.float32} else MasterWeightAdamW
    if dp_group is None:
        return cls(groups, **kwargs)
    if len(dtypes) > 1:
        odd = [n for m in model_chunks for n, p in m.named_parameters() if p.requires_grad and p.dtype == torch.float32]
        kinds = " and ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        raise ConfigError(
            f"parallel.distributed_optimizer=true needs every trainable parameter in one dtype (torch's "
            f"ZeroRedundancyOptimizer refuses a mix), but this model has {kinds} ones, e.g. "
            f"{', '.join(odd[:3])} (Megatron's torch norms keep fp32 weights without Transformer Engine / Apex). "
            f"Set parallel.distributed_optimizer=false, or model.params_dtype=fp32"
        )
    # parameters_as_bucket_view=False: parameters keep their own storage (Megatron's tensors, the
    # checkpoint loaders and the rollout refit hold references to them); one broadcast per parameter.
    # With MasterWeightAdamW the fp32 masters live in the optimizer state, so ZeRO shards them too.
    return ZeroRedundancyOptimizer(
        groups, optimizer_class=cls, process_group=dp_group, parameters_as_bucket_view=False, **kwargs
    )


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for bf16 parameters with fp32 master weights (what Megatron's mixed-precision optimizer does).

    An RL fine-tuning step (lr ~1e-6) changes a weight by far less than bf16's resolution (2^-8 relative),
    so AdamW run on bf16 parameters rounds most updates away and the model barely learns. Here each
    parameter's optimizer state holds an fp32 `master` copy and fp32 moments; a step takes the gradient
    (the fp32 `main_grad` accumulator when distributed.grads attached one, else `.grad`), upcasts it,
    runs torch's own single-tensor AdamW arithmetic on the master, and writes the master back rounded to
    the parameter's dtype. Memory per parameter: 4 (master) + 8 (moments) bytes, as the planner counts.
    Written here because torch has no such optimizer and Megatron's needs its DDP grad buffers (above).
    The masters are part of `state_dict()`, so checkpoints (and ZeRO-1 shards) carry them and a resume
    continues from the fp32 values, not from the rounded parameters.
    """

    def __init__(self, params, **kwargs) -> None:
        for flag in ("amsgrad", "fused", "capturable", "differentiable"):
            if kwargs.get(flag):
                raise ValueError(f"MasterWeightAdamW does not support {flag}=True")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        # One parameter at a time through torch's functional AdamW (the same single-tensor arithmetic as
        # torch.optim.AdamW with foreach=False): only one fp32 gradient copy is alive at a time.
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = grad_of(p)
                if grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)  # on the host, like torch's default
                    st["master"] = p.detach().to(torch.float32, copy=True)
                    st["exp_avg"] = torch.zeros_like(st["master"])
                    st["exp_avg_sq"] = torch.zeros_like(st["master"])
                adam(
                    [st["master"]],
                    [grad.to(torch.float32)],
                    [st["exp_avg"]],
                    [st["exp_avg_sq"]],
                    [],
                    [st["step"]],
                    foreach=False,
                    capturable=False,
                    differentiable=False,
                    fused=None,
                    grad_scale=None,
                    found_inf=None,
                    has_complex=False,
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )
                p.copy_(st["master"])
        return None

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch casts every loaded state tensor to its parameter's dtype, which would round the fp32
        # masters and moments to bf16: put the saved fp32 tensors back.
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            for key, value in (state_dict["state"].get(i) or {}).items():
                if key != "step" and torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """lr(step): linear warmup over `warmup_steps`, then cosine from lr to min_lr at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    base = cfg.lr if cfg.lr > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total_steps, cfg) / base)
