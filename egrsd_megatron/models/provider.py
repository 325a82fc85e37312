"""Megatron-Core model provider: ModelArch + ModelConfig -> TransformerConfig, layer spec, GPTModel.

Layer spec: Transformer Engine's when TE is installed and CUDA is present (required for FP8), the local
(torch) spec otherwise, its core attention replaced by models/packed_attention.py's subclass so that packed
sequences (PackedSeqParams, THD) run on CPU too (without packed_seq_params it is Megatron's own code).
The vocabulary is padded to a multiple of 128 x TP (Megatron-LM's rule) so every TP
rank holds an equal slice; the padded size is recorded on the model as `model.egrsd_padded_vocab_size` and
in checkpoint metadata. Padded logit columns (ids >= arch.vocab_size, all on the last TP rank) are NOT
real tokens: callers mask them (see `vocab_slice`) before any softmax over the vocabulary.
KV groups (and so heads) that TP does not divide are padded with exactly-zero groups (ModelArch.megatron_groups,
models/group_padding.py): logits and gradients are unchanged, and build_model zeroes the padding that
Megatron's random init filled. With padding the random init of the real weights differs from TP=1's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config.schema import ModelConfig
from .arch import ModelArch
from .group_padding import zero_padding_groups_
from .precision import cuda_capability, precision_fields, te_available


def use_te_spec() -> bool:
    return te_available() and cuda_capability() is not None


def transformer_config(arch: ModelArch, model_cfg: ModelConfig, tp: int, pp: int):
    """The Megatron TransformerConfig of `arch` at TP x PP (precision and recompute from `model_cfg`)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_parallel(tp, pp)
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.megatron_heads(tp),
        # Padded (zero) KV groups when TP does not divide num_kv_heads: see ModelArch.megatron_groups.
        num_query_groups=arch.megatron_groups(tp),
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Fusions need CUDA kernels (apex / TE); the unfused paths are exact and run everywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        # Weights are created whole on the CPU and then sliced per TP rank: the same seed gives the same
        # full model at any TP (and a CPU-only machine has no other choice).
        use_cpu_initialization=True,
    )
    kw.update(precision_fields(model_cfg))
    if model_cfg.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif model_cfg.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kw)


def layer_spec(arch: ModelArch):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te_spec():
        # Packed sequences go to TEDotProductAttention's own THD path: not run on this project's CPU
        # machines, UNVERIFIED here (bench/gpu_check.sh is where a GPU checks it).
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    # Lazy: packed_attention imports Megatron (seconds) and this module's causal_mask.
    from .packed_attention import PackedDotProductAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def build_model(arch: ModelArch, model_cfg: ModelConfig):
    """This rank's GPTModel chunk: TP/PP sizes and the stage come from Megatron's parallel_state.

    Requires `init_distributed(tp, pp)` first. Weights are randomly initialised (Megatron's init, same on
    every TP layout for a given seed); load real weights with checkpoint.reshard.load_hf_weights or
    checkpoint.formats.load_checkpoint.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(arch, model_cfg, tp, pp)
    padded = arch.padded_vocab_size(tp)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch),
        vocab_size=padded,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
    )
    # Megatron's random init also fills the padding groups; they must be exactly zero (exactness invariant).
    zero_padding_groups_(model, arch, tp, ps.get_tensor_model_parallel_rank())
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.egrsd_padded_vocab_size = padded
    model.egrsd_arch = arch
    return model


def vocab_slice(arch: ModelArch, tp: int, tp_rank: int) -> Tuple[int, int, int]:
    """(start, end, n_valid) of this TP rank's logits columns: ids [start, end), the first n_valid are real."""
    per = arch.padded_vocab_size(tp) // tp
    start = tp_rank * per
    return start, start + per, max(0, min(per, arch.vocab_size - start))


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Megatron's boolean attention mask [1, 1, T, T]: True = masked (key after query)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def forward_logits(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits [B, T, V_local] (this TP rank's padded vocab slice) of a PP=1 model.

    The causal mask is explicit (Megatron's implicit one builds a CUDA tensor). For PP > 1 run the model
    through Megatron's pipeline schedule (megatron.core.pipeline_parallel.get_forward_backward_func).
    """
    b, t = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=causal_mask(t, input_ids.device))


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device: Optional[torch.device] = None):
    """Megatron's PackedSeqParams (THD, self-attention) of one pack: cu_seqlens [n+1] int32, max segment length.

    `max_seqlen` must be the TRUE longest segment: Megatron's unfused THD RoPE takes a frequency table of
    exactly cu_seqlens[-1] rows to mean "positions continue across the pack" (rope_utils, 0.16.1).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    lens = cu[1:] - cu[:-1]
    if int(lens.max()) != int(max_seqlen):
        raise ValueError(f"packed_seq_params: max_seqlen {max_seqlen} != longest segment {int(lens.max())}")
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen)
    )


def forward_packed_logits(
    model, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Logits [1, T, V_local] of a PP=1 model on one pack (input_ids/position_ids [1, T], see data/packing.py).

    No attention mask: the packed attention (TE's or models/packed_attention.py's) is causal per segment.
    For PP > 1 pass the same four arguments through the pipeline schedule's forward step.
    """
    return model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=None,
        packed_seq_params=packed_seq_params(cu_seqlens, max_seqlen, input_ids.device),
    )
