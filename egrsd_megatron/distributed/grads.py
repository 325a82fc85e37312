"""Gradient finalisation and clipping for Megatron-Core models without Megatron's DDP wrapper.

Why not Megatron's `finalize_model_grads` / `clip_grad_norm_fp32`: both expect DDP-wrapped models
(`main_grad` buffers) and the clip asserts CUDA tensors; these work on CPU and GPU, on plain `.grad` or
on this module's own fp32 `main_grad` accumulators.

After backward, per rank:
1. QK-layernorm weights are replicated across TP ranks but see different heads on each: their grads are
   partial sums -> all-reduce SUM over the TP group (Megatron does the same for qk_layernorm).
2. Tied embeddings with PP > 1: the input embedding (first stage) and the output layer (last stage)
   hold the same weight -> all-reduce SUM over the embedding group.
3. Data parallel: each DP rank's loss is already divided by the GLOBAL token count, so grads are
   all-reduced with SUM over the DP group.
Clipping: the global L2 norm over all model-parallel shards, counting TP-replicated params once.

Low-precision (bf16) parameters accumulate their gradient in fp32, as Megatron's DDP does with its
`main_grad` buffers: `attach_fp32_grad_accumulators` hooks each such parameter so that, after every
backward, its bf16 `.grad` is added into an fp32 `main_grad` and freed. Summed over many micro-batches,
each micro-batch's gradient is then rounded to fp32, not the running sum to bf16. Everything here (and
the optimizer) reads a parameter's gradient through `grad_of`.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


def grad_of(p: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient a step uses: the fp32 `main_grad` accumulator when the parameter has one, else `.grad`."""
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


def _fold_into_main_grad(p: torch.nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


def attach_fp32_grad_accumulators(model_chunks: List[torch.nn.Module]) -> int:
    """Give every trainable non-fp32 parameter an fp32 `main_grad` fed by a post-accumulate-grad hook;
    returns how many parameters got one. Memory: 4 bytes per such parameter (the planner counts it)."""
    n = 0
    for m in model_chunks:
        for p in m.parameters():
            if p.requires_grad and p.dtype != torch.float32 and getattr(p, "main_grad", None) is None:
                p.main_grad = torch.zeros_like(p, dtype=torch.float32)
                p.register_post_accumulate_grad_hook(_fold_into_main_grad)
                n += 1
    return n


def zero_grads(model_chunks: List[torch.nn.Module]) -> None:
    """Drop `.grad` and zero the fp32 accumulators (call before a step's first backward)."""
    for m in model_chunks:
        for p in m.parameters():
            p.grad = None
            if getattr(p, "main_grad", None) is not None:
                p.main_grad.zero_()


def _grads(params: Iterable[torch.nn.Parameter]) -> List[torch.Tensor]:
    return [g for g in map(grad_of, params) if g is not None]


def _all_reduce_coalesced(tensors: List[torch.Tensor], group) -> None:
    """One SUM all-reduce for a list of tensors (flatten -> reduce -> copy back)."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, r in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(r)


def finalize_grads(model_chunks: List[torch.nn.Module]) -> None:
    # 1. QK-layernorm partial grads across TP.
    qk = _grads(p for m in model_chunks for n, p in m.named_parameters() if "q_layernorm" in n or "k_layernorm" in n)
    _all_reduce_coalesced(qk, ps.get_tensor_model_parallel_group())

    # 2. Tied word embeddings shared between the first and last pipeline stage.
    if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        for m in model_chunks:
            if getattr(m, "share_embeddings_and_output_weights", False):
                w = m.shared_embedding_or_output_weight()
                if w is not None and grad_of(w) is not None:
                    dist.all_reduce(grad_of(w), group=ps.get_embedding_group())

    # 3. Data parallel.
    if ps.get_data_parallel_world_size() > 1:
        _all_reduce_coalesced(_grads(p for m in model_chunks for p in m.parameters()), ps.get_data_parallel_group())


def global_grad_norm(model_chunks: List[torch.nn.Module]) -> torch.Tensor:
    """L2 norm of all gradients of the model (every TP/PP shard), TP-replicated params counted once."""

    sq = torch.zeros((), dtype=torch.float64)
    for m in model_chunks:
        for p in m.parameters():
            g = grad_of(p)
            if g is None:
                continue
            # Tied output weight on the last stage duplicates the first stage's embedding: count once.
            if (
                getattr(p, "shared", False)
                and ps.get_pipeline_model_parallel_world_size() > 1
                and not ps.is_pipeline_first_stage()
            ):
                continue
            if param_is_not_tensor_parallel_duplicate(p) or ps.get_tensor_model_parallel_rank() == 0:
                sq += g.detach().double().pow(2).sum().cpu()
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
                for g in _grads(m.parameters()):
                    g.mul_(coef.to(g.dtype))
    return float(norm)
