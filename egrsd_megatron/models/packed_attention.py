"""Core attention for Megatron's LOCAL layer spec that honours packed sequences (`PackedSeqParams`, THD).

Megatron-Core 0.16.1's local `DotProductAttention` asserts `packed_seq_params is None`; only Transformer
Engine's `TEDotProductAttention` takes the packed (THD) path. On CPU (no TE) this subclass gives the local
spec the same path, so the CPU suite runs packed batches through the same GPTModel code as a GPU.

Layout Megatron uses for a packed micro-batch (checked in 0.16.1's source, the same with TE):
  input_ids / position_ids [1, T]        b = 1, the n sequences concatenated, T = cu_seqlens[-1]
  hidden states            [T, 1, H]     ("sbhd" with b = 1)
  q / k / v at this module [T, np, hn]   SelfAttention squeezes the dummy b when qkv_format == "thd"
  this module's output     [T, np * hn]  SelfAttention reshapes it back to [T, 1, np * hn]
RoPE: with `packed_seq_params`, GPTModel builds rotary frequencies for max_seqlen positions and
`apply_rotary_pos_emb` (rope_utils._apply_rotary_pos_emb_thd) gives every segment of cu_seqlens the
positions 0 .. len-1, so positions restart per sequence; `position_ids` are not read by RoPE.

Math, per segment s = [a, b) of cu_seqlens (self-attention: cu_seqlens_q == cu_seqlens_kv):
  out[a:b] = softmax(scale * q[a:b] k[a:b]^T + causal mask) v[a:b]    (GQA: k, v repeated per group)
i.e. block-diagonal causal attention; no query ever reads a key of another segment (exactly: the other
segments' keys are never in the product). Each segment is computed by the parent class on a [len, 1, np, hn]
view, the same code and shapes as that sequence run alone, so a segment's attention is bitwise what the
padded path computes for it with b = 1.
Without `packed_seq_params` the parent class runs unchanged (the padded path).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from .provider import causal_mask


def segment_bounds(params: PackedSeqParams, total: int) -> list[int]:
    """cu_seqlens of a self-attention THD pack as a list, checked against the pack length `total`."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed attention: qkv_format {params.qkv_format!r}, only 'thd' is supported")
    if params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
        # Padded cu_seqlens exist for context parallelism (TE); CP is not supported by the local spec.
        raise ValueError(
            "packed attention: cu_seqlens_*_padded are not supported by the local spec; pad by "
            "making the padding its own segment of cu_seqlens (data.packing.pack_sequences)"
        )
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_kv is not None and not torch.equal(cu_q.cpu(), cu_kv.cpu()):
        raise ValueError("packed attention: self-attention needs cu_seqlens_q == cu_seqlens_kv")
    bounds = [int(x) for x in cu_q.tolist()]
    if bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"packed attention: cu_seqlens {bounds} must rise from 0 to the pack length {total}")
    return bounds


class PackedDotProductAttention(DotProductAttention):
    """Megatron's DotProductAttention plus the packed (THD) path: block-diagonal causal attention."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if packed_seq_params is None:
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type, attention_bias=attention_bias
            )
        if attention_bias is not None:
            raise ValueError("packed attention: attention_bias is not supported")
        if query.dim() != 3:
            raise ValueError(f"packed attention: q must be [T, heads, head_dim] (thd), got {tuple(query.shape)}")
        bounds = segment_bounds(packed_seq_params, query.shape[0])
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            if b == a:  # an empty segment contributes no tokens
                continue
            # attention_mask of the whole pack is ignored: each segment gets its own causal mask.
            outs.append(
                super().forward(
                    query[a:b, None],
                    key[a:b, None],
                    value[a:b, None],
                    causal_mask(b - a, query.device),
                    attn_mask_type=attn_mask_type,
                )
            )
        return torch.cat(outs, dim=0).squeeze(1)  # [T, 1, np*hn] -> [T, np*hn]
