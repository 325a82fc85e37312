"""Named architectures (published Qwen3 sizes, tiny test models) and `resolve_arch(model_cfg)`.

Qwen3 sizes are the published config.json values (../../docs/environment.md): head_dim 128, rope_theta
1e6, rms eps 1e-6, vocab 151936, SwiGLU, QK-norm, no biases, max_position_embeddings 40960.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict

from ..config.schema import ConfigError, ModelConfig
from .arch import ModelArch


def _qwen3(layers: int, hidden: int, heads: int, ffn: int, tied: bool) -> ModelArch:
    return ModelArch(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        ffn_hidden_size=ffn,
        vocab_size=151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qk_norm=True,
        tie_word_embeddings=tied,
        max_position_embeddings=40960,
        family="qwen3",
    )


PRESETS: Dict[str, ModelArch] = {
    "qwen3_0.6b": _qwen3(28, 1024, 16, 3072, True),
    "qwen3_1.7b": _qwen3(28, 2048, 16, 6144, True),
    "qwen3_4b": _qwen3(36, 2560, 32, 9728, True),
    "qwen3_8b": _qwen3(36, 4096, 32, 12288, False),
    "qwen3_14b": _qwen3(40, 5120, 40, 17408, False),
    "qwen3_32b": _qwen3(64, 5120, 64, 25600, False),
    # Tiny test models: every code path (GQA with 2 heads per group, QK-norm, TP=2 and PP=2 splits, vocab
    # padding at TP=2 since 200 is not a multiple of 128) at a size whose forward takes milliseconds.
    "qwen3_tiny": ModelArch(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_size=128,
        vocab_size=200,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qk_norm=True,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        family="qwen3",
    ),
}
# qwen3_tiny with room for the byte-level tokenizer (261 ids): tiny end-to-end training runs.
PRESETS["qwen3_tiny_chat"] = dataclasses.replace(PRESETS["qwen3_tiny"], vocab_size=320, max_position_embeddings=1024)
# The same shapes in the Llama family: no QK-norm, tied embeddings.
PRESETS["llama_tiny"] = dataclasses.replace(
    PRESETS["qwen3_tiny"], rope_theta=1e5, rms_norm_eps=1e-5, qk_norm=False, tie_word_embeddings=True, family="llama"
)


def resolve_arch(model_cfg: ModelConfig) -> ModelArch:
    """The architecture named by `model.preset` ("hf": read `model.hf_path`/config.json)."""
    name = model_cfg.preset
    if name == "hf":
        if not model_cfg.hf_path:
            raise ConfigError(
                "config key 'model.hf_path': model.preset=hf needs model.hf_path=<folder with config.json>"
            )
        return ModelArch.from_hf_config(os.path.expanduser(model_cfg.hf_path))
    if name not in PRESETS:
        raise ConfigError(
            f"config key 'model.preset': unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}, hf"
        )
    return PRESETS[name]
