"""The Hugging Face <-> Megatron-Core (local spec) name and layout mapping, per tensor, framework-free.

A `ParamMap` ties one Megatron parameter (canonical local-spec name with the GLOBAL layer index) to the
Hugging Face tensors it is made of, and a `kind` saying how TP shards are cut:
- rep:     replicated on every TP rank (norms).
- qknorm:  replicated q/k-norm weights; under TP each rank's gradient covers only its heads (sum over TP).
- vocab:   rows = vocabulary, padded with zero rows to 128 x TP, split along dim 0 (embedding, lm head).
- row:     split along dim 1 (RowParallelLinear: down_proj -> linear_fc2).
- qkv:     q/k/v -> linear_qkv laid out per query group [q heads of the group; k; v]; TP splits whole groups.
- proj:    o_proj -> linear_proj, split along dim 1 by whole query groups.
qkv and proj hold ModelArch.megatron_groups(tp) groups: when TP does not divide the KV groups, zero groups
are appended (HF -> Megatron) and dropped after checking they are exactly zero (Megatron -> HF).
- fc1:     gate/up -> linear_fc1; TP rank r holds cat(gate shard r, up shard r).
(Facts from ../../docs/environment.md; checked against transformers logits in the tests.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..models.arch import ModelArch


@dataclass(frozen=True)
class ParamMap:
    mname: str  # Megatron name, global layer index
    hf_names: Tuple[str, ...]
    kind: str
    layer: Optional[int] = None  # None: embedding / final norm / output layer

    def local_name(self, layer_offset: int) -> str:
        if self.layer is None:
            return self.mname
        return self.mname.replace(f"decoder.layers.{self.layer}.", f"decoder.layers.{self.layer - layer_offset}.", 1)


def layer_params(arch: ModelArch, i: int) -> List[ParamMap]:
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = [
        ParamMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "rep", i),
        ParamMap(
            m + "self_attention.linear_qkv.weight",
            (h + "self_attn.q_proj.weight", h + "self_attn.k_proj.weight", h + "self_attn.v_proj.weight"),
            "qkv",
            i,
        ),
    ]
    if arch.qk_norm:
        out += [
            ParamMap(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",), "qknorm", i),
            ParamMap(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",), "qknorm", i),
        ]
    out += [
        ParamMap(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "proj", i),
        ParamMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "rep", i),
        ParamMap(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "fc1", i),
        ParamMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "row", i),
    ]
    return out


EMBED = ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "rep")


def output_param(arch: ModelArch) -> ParamMap:
    # Tied: the output layer is the embedding matrix (held again on the last stage when PP > 1).
    return ParamMap(
        "output_layer.weight",
        ("model.embed_tokens.weight",) if arch.tie_word_embeddings else ("lm_head.weight",),
        "vocab",
    )


def emitters(arch: ModelArch) -> List[ParamMap]:
    """Every Megatron parameter that defines Hugging Face tensors, in Hugging Face order (tied lm head excluded)."""
    out = [EMBED]
    for i in range(arch.num_layers):
        out += layer_params(arch, i)
    out.append(FINAL_NORM)
    if not arch.tie_word_embeddings:
        out.append(output_param(arch))
    return out


def hf_shapes(arch: ModelArch) -> Dict[str, Tuple[int, ...]]:
    """Full Hugging Face tensor shapes, in Hugging Face order."""
    h, d = arch.hidden_size, arch.head_dim
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
                p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
                p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
            }
        )
        if arch.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        shapes.update(
            {
                p + "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (arch.ffn_hidden_size, h),
                p + "mlp.up_proj.weight": (arch.ffn_hidden_size, h),
                p + "mlp.down_proj.weight": (h, arch.ffn_hidden_size),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def layers_per_stage(arch: ModelArch, pp: int) -> int:
    arch.check_parallel(1, pp)
    return arch.num_layers // pp


def stage_of(pm: ParamMap, arch: ModelArch, pp: int) -> int:
    if pm.layer is not None:
        return pm.layer // layers_per_stage(arch, pp)
    return 0 if pm.mname == EMBED.mname else pp - 1


def stage_params(arch: ModelArch, pp: int, pp_rank: int) -> List[Tuple[str, ParamMap]]:
    """(local name, map) of every parameter on PP stage `pp_rank` (Megatron numbers layers per stage from 0)."""
    n = layers_per_stage(arch, pp)
    out: List[Tuple[str, ParamMap]] = []
    if pp_rank == 0:
        out.append((EMBED.mname, EMBED))
    for i in range(pp_rank * n, (pp_rank + 1) * n):
        out += [(pm.local_name(pp_rank * n), pm) for pm in layer_params(arch, i)]
    if pp_rank == pp - 1:
        out.append((FINAL_NORM.mname, FINAL_NORM))
        # Tied at PP=1: the output layer reuses the embedding parameter (no weight of its own).
        if not (arch.tie_word_embeddings and pp == 1):
            out.append((output_param(arch).mname, output_param(arch)))
    return out


def stage_extra_state_keys(arch: ModelArch, pp: int, pp_rank: int) -> List[str]:
    """`_extra_state` entries (None for the local spec) that GPTModel.state_dict() has on this stage."""
    n = layers_per_stage(arch, pp)
    keys = []
    for j in range(n):
        keys += [
            f"decoder.layers.{j}.self_attention.linear_proj._extra_state",
            f"decoder.layers.{j}.self_attention.linear_qkv._extra_state",
            f"decoder.layers.{j}.mlp.linear_fc1._extra_state",
            f"decoder.layers.{j}.mlp.linear_fc2._extra_state",
        ]
    if pp_rank == pp - 1:
        keys.append("output_layer._extra_state")
    return keys


# Transformer Engine spec folds the norms into the following linear layer.
_TE_NAMES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
)


def canonical_local_name(name: str) -> str:
    """A model parameter name in local-spec form (TE spec names of fused norms translated)."""
    for pat, repl in _TE_NAMES:
        if pat.search(name):
            return pat.sub(repl, name)
    return name


# ---- per-tensor layout ---------------------------------------------------------------------------------
def shard_from_hf(
    pm: ParamMap, tensors: Sequence[torch.Tensor], arch: ModelArch, tp: int, tp_rank: int
) -> torch.Tensor:
    """TP shard `tp_rank` of Megatron parameter `pm` from its full Hugging Face tensors (a new contiguous
    tensor)."""
    k = pm.kind
    if k in ("rep", "qknorm"):
        return tensors[0].clone()
    if k == "vocab":
        w = tensors[0]
        padded = arch.padded_vocab_size(tp)
        per = padded // tp
        out = w.new_zeros((per,) + tuple(w.shape[1:]))  # padding rows are zeros
        lo, hi = tp_rank * per, min((tp_rank + 1) * per, w.shape[0])
        if hi > lo:
            out[: hi - lo].copy_(w[lo:hi])
        return out
    if k == "row":
        return tensors[0].chunk(tp, dim=1)[tp_rank].contiguous().clone()
    if k == "qkv":
        q, kk, v = tensors
        g, d, hpg, h = arch.num_kv_heads, arch.head_dim, arch.heads_per_group, q.shape[1]
        gl = arch.megatron_groups(tp) // tp
        lo, hi = min(tp_rank * gl, g), min((tp_rank + 1) * gl, g)  # this rank's real groups
        fused = q.new_zeros((gl, (hpg + 2) * d, h))  # padding groups stay zero
        fused[: hi - lo] = torch.cat(
            [q.view(g, hpg * d, h)[lo:hi], kk.view(g, d, h)[lo:hi], v.view(g, d, h)[lo:hi]], dim=1
        )
        return fused.reshape(gl * (hpg + 2) * d, h)
    if k == "proj":
        w = tensors[0]
        g, cols = arch.num_kv_heads, arch.heads_per_group * arch.head_dim
        gl = arch.megatron_groups(tp) // tp
        lo, hi = min(tp_rank * gl, g), min((tp_rank + 1) * gl, g)
        out = w.new_zeros((w.shape[0], gl * cols))  # padding columns stay zero
        out[:, : (hi - lo) * cols] = w[:, lo * cols : hi * cols]
        return out
    if k == "fc1":
        gate, up = tensors
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0).contiguous()
    raise ValueError(f"unknown mapping kind {k!r} for {pm.mname}")


def hf_from_shards(pm: ParamMap, shards: Sequence[torch.Tensor], arch: ModelArch) -> List[torch.Tensor]:
    """Inverse of `shard_from_hf`: the full, unpadded Hugging Face tensors from all TP shards (in TP order)."""
    k, tp = pm.kind, len(shards)
    if k in ("rep", "qknorm"):
        return [shards[0].clone()]
    if k == "vocab":
        return [torch.cat(list(shards), dim=0)[: arch.vocab_size].clone()]
    if k == "row":
        return [torch.cat(list(shards), dim=1)]
    if k == "qkv":
        g, d, hpg = arch.num_kv_heads, arch.head_dim, arch.heads_per_group
        h = shards[0].shape[1]
        gm = arch.megatron_groups(tp)
        fused = torch.cat([s.view(gm // tp, (hpg + 2) * d, h) for s in shards], dim=0)
        _check_zero_padding(pm, fused[g:], tp)
        q, kk, v = fused[:g].split([hpg * d, d, d], dim=1)
        return [
            q.reshape(g * hpg * d, h).contiguous(),
            kk.reshape(g * d, h).contiguous(),
            v.reshape(g * d, h).contiguous(),
        ]
    if k == "proj":
        cols = arch.num_attention_heads * arch.head_dim
        full = torch.cat(list(shards), dim=1)
        _check_zero_padding(pm, full[:, cols:], tp)
        return [full[:, :cols].contiguous()]
    if k == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([a for a, _ in halves], dim=0), torch.cat([b for _, b in halves], dim=0)]
    raise ValueError(f"unknown mapping kind {k!r} for {pm.mname}")


def _check_zero_padding(pm: ParamMap, pad: torch.Tensor, tp: int) -> None:
    """Padding groups must be exactly zero; anything else means the exactness invariant broke."""
    if pad.numel() and bool(pad.ne(0).any()):
        raise ValueError(
            f"{pm.mname} (layer {pm.layer}): the zero-padding KV group(s) added at TP={tp} hold "
            f"non-zero values (max |x| = {pad.abs().max().item():.3g}): "
            f"the padding invariant broke (something wrote into the padded heads, e.g. an optimizer "
            f"with noise or a non-zero init); these values cannot be represented in the Hugging Face "
            f"model"
        )
