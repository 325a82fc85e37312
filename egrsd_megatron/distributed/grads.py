"""Gradient finalisation and clipping for Megatron-Core models without Megatron's DDP wrapper.

Why not Megatron's `finalize_model_grads` / `clip_grad_norm_fp32`: both expect DDP-wrapped models
(`main_grad` buffers) and the clip asserts CUDA tensors; these work on plain `.grad` on CPU and GPU.

After backward, per rank:
1. QK-layernorm weights are replicated across TP ranks but see different heads on each: their grads are
   partial sums -> all-reduce SUM over the TP group (Megatron does the same for qk_layernorm).
2. Tied embeddings with PP > 1: the input embedding (first stage) and the output layer (last stage)
   hold the same weight -> all-reduce SUM over the embedding group.
3. Data parallel: each DP rank's loss is already divided by the GLOBAL token count, so grads are
   all-reduced with SUM over the DP group.
Clipping: the global L2 norm over all model-parallel shards, counting TP-replicated params once.
"""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.distributed as dist


def _grads(params: Iterable[torch.nn.Parameter]) -> List[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _all_reduce_coalesced(tensors: List[torch.Tensor], group) -> None:
    """One SUM all-reduce for a list of tensors (flatten -> reduce -> copy back)."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, r in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


def finalize_grads(model_chunks: List[torch.nn.Module]) -> None:
    from megatron.core import parallel_state as ps

    # 1. QK-layernorm partial grads across TP.
    qk = [p.grad for m in model_chunks for n, p in m.named_parameters()
          if p.grad is not None and ("q_layernorm" in n or "k_layernorm" in n)]
    _all_reduce_coalesced(qk, ps.get_tensor_model_parallel_group())

    # 2. Tied word embeddings shared between the first and last pipeline stage.
    if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        for m in model_chunks:
            if getattr(m, "share_embeddings_and_output_weights", False):
                w = m.shared_embedding_or_output_weight()
                if w is not None and w.grad is not None:
                    dist.all_reduce(w.grad, group=ps.get_embedding_group())

    # 3. Data parallel.
    if ps.get_data_parallel_world_size() > 1:
        _all_reduce_coalesced(_grads(p for m in model_chunks for p in m.parameters()),
                              ps.get_data_parallel_group())


def global_grad_norm(model_chunks: List[torch.nn.Module]) -> torch.Tensor:
    """L2 norm of all gradients of the model (every TP/PP shard), TP-replicated params counted once."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros((), dtype=torch.float64)
    for m in model_chunks:
        for p in m.parameters():
            if p.grad is None:
                continue
            # Tied output weight on the last stage duplicates the first stage's embedding: count once.
            if getattr(p, "shared", False) and ps.get_pipeline_model_parallel_world_size() > 1 \
                    and not ps.is_pipeline_first_stage():
                continue
            if param_is_not_tensor_parallel_duplicate(p) or ps.get_tensor_model_parallel_rank() == 0:
                sq += p.grad.detach().double().pow(2).sum().cpu()
    sq = sq.to(next(model_chunks[0].parameters()).device)
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt().float()


def clip_grads(model_chunks: List[torch.nn.Module], max_norm: float) -> float:
    """Scale all grads so the global norm is <= max_norm (0: only measure). Returns the norm before."""
    norm = global_grad_norm(model_chunks)
    if max_norm > 0 and torch.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for m in model_chunks:
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.dtype))
    return float(norm)
