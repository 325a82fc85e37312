"""Qwen3 / Llama-family models on Megatron-Core: architecture, presets, precision, model provider."""

from .arch import ModelArch
from .presets import PRESETS, resolve_arch
from .provider import (
    build_model,
    causal_mask,
    forward_logits,
    forward_packed_logits,
    layer_spec,
    packed_seq_params,
    transformer_config,
    vocab_slice,
)

__all__ = [
    "ModelArch",
    "PRESETS",
    "resolve_arch",
    "build_model",
    "causal_mask",
    "forward_logits",
    "forward_packed_logits",
    "layer_spec",
    "packed_seq_params",
    "transformer_config",
    "vocab_slice",
]
