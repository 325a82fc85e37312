"""AdamW with linear warmup + cosine decay, over this rank's parameter shards.

Why torch AdamW rather than Megatron's optimizer here: Megatron's optimizer needs DDP-wrapped models
and CUDA tensors for its grad clipping; with gradients finalised by `distributed.grads` every rank
updates its own shards identically to what Megatron's (non-distributed) optimizer would compute, on CPU
and GPU alike. The distributed (ZeRO-1) optimizer is not wired into this trainer yet.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..config import OptimConfig


def build_optimizer(model_chunks: List[torch.nn.Module], cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for m in model_chunks:
        for n, p in m.named_parameters():
            if not p.requires_grad:
                continue
            # Norm weights and biases are not decayed (standard for LLM fine-tuning).
            (no_decay if p.ndim == 1 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: identical update order on every backend keeps CPU resume bitwise reproducible.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)


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
