"""Views of the zero (padding) KV groups that ModelArch.megatron_groups adds when TP does not divide them.

Megatron's linear_qkv rows are laid out per local query group: [q heads of the group; k; v], each
(heads_per_group + 2) x head_dim rows; linear_proj's input columns per local group are heads_per_group x
head_dim. Padding groups have the global indices num_kv_heads .. megatron_groups(tp) - 1, so on TP rank r
the local groups with index >= num_kv_heads - r x groups_per_rank are padding.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .arch import ModelArch


def real_local_groups(arch: ModelArch, tp: int, tp_rank: int) -> int:
    """How many of TP rank `tp_rank`'s query groups are real (the rest, at the end, are padding)."""
    gl = arch.megatron_groups(tp) // tp
    return max(0, min(gl, arch.num_kv_heads - tp_rank * gl))


def padding_view(kind: str, t: torch.Tensor, arch: ModelArch, tp: int, tp_rank: int) -> torch.Tensor:
    """The padding part of a local linear_qkv ("qkv") or linear_proj ("proj") weight / grad (a view)."""
    gl = arch.megatron_groups(tp) // tp
    real = real_local_groups(arch, tp, tp_rank)
    if kind == "qkv":
        return t.view(gl, -1, t.shape[-1])[real:]
    if kind == "proj":
        return t.view(t.shape[0], gl, -1)[:, real:]
    raise ValueError(f"padding_view: kind must be 'qkv' or 'proj', got {kind!r}")


def padding_params(model: torch.nn.Module) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    """(name, kind, parameter) of every attention weight that can hold padding groups."""
    for name, p in model.named_parameters():
        if name.endswith("self_attention.linear_qkv.weight"):
            yield name, "qkv", p
        elif name.endswith("self_attention.linear_proj.weight"):
            yield name, "proj", p


def zero_padding_groups_(model: torch.nn.Module, arch: ModelArch, tp: int, tp_rank: int) -> None:
    """Set this rank's padding groups to exactly zero (no-op when TP divides num_kv_heads)."""
    if arch.padded_groups(tp) == 0:
        return
    with torch.no_grad():
        for _, kind, p in padding_params(model):
            padding_view(kind, p.data, arch, tp, tp_rank).zero_()
