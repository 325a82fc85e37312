"""ModelArch <-> Hugging Face config, presets, vocab padding, precision mapping, TransformerConfig."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from egrsd_megatron.config.schema import ConfigError, ModelConfig
from egrsd_megatron.models import PRESETS, ModelArch, precision, resolve_arch, transformer_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip_through_transformers(name, tmp_path):
    from transformers import AutoConfig

    arch = PRESETS[name]
    d = arch.to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = AutoConfig.from_pretrained(tmp_path)  # transformers itself accepts it
    assert type(cfg).__name__ == ("Qwen3Config" if arch.family == "qwen3" else "LlamaConfig")
    assert ModelArch.from_hf_config(str(tmp_path)) == arch
    assert ModelArch.from_hf_config(cfg.to_dict() | {"architectures": d["architectures"]}) == arch


def test_published_qwen3_sizes():
    a = PRESETS["qwen3_0.6b"]
    # 0.6B: 596M parameters with tied embeddings (0.44B without the embedding)
    assert 0.59e9 < a.num_params() < 0.61e9
    assert PRESETS["qwen3_8b"].tie_word_embeddings is False and PRESETS["qwen3_4b"].tie_word_embeddings is True
    assert 8.1e9 < PRESETS["qwen3_8b"].num_params() < 8.3e9


def test_num_params_matches_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("qwen3_tiny", "llama_tiny"):
        d = PRESETS[name].to_hf_config()
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
        assert sum(p.numel() for p in m.parameters()) == PRESETS[name].num_params()


def test_padded_vocab():
    a = PRESETS["qwen3_0.6b"]
    assert a.padded_vocab_size(1) == 151936  # already a multiple of 128
    assert a.padded_vocab_size(2) == 152064  # multiple of 256
    assert a.padded_vocab_size(8) == 152576
    assert PRESETS["qwen3_tiny"].padded_vocab_size(2) == 256


def test_resolve_arch(tmp_path):
    assert resolve_arch(ModelConfig(preset="qwen3_8b")) == PRESETS["qwen3_8b"]
    with pytest.raises(ConfigError, match="unknown preset 'qwen4'.*qwen3_0.6b"):
        resolve_arch(ModelConfig(preset="qwen4"))
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama_tiny"].to_hf_config()))
    assert resolve_arch(ModelConfig(preset="hf", hf_path=str(tmp_path))) == PRESETS["llama_tiny"]


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unknown architecture.*Mistral"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "yarn"),
    ],
)
def test_from_hf_config_refuses_unsupported(patch, match):
    d = PRESETS["qwen3_tiny"].to_hf_config() | patch
    with pytest.raises(ConfigError, match=match):
        ModelArch.from_hf_config(d)


def test_missing_key_and_bad_parallel():
    d = PRESETS["qwen3_tiny"].to_hf_config()
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelArch.from_hf_config(d)
    a = PRESETS["qwen3_tiny"]  # 4 heads, 2 kv heads, 2 layers, ffn 128
    a.check_parallel(4, 1)  # KV groups padded 2 -> 4 (heads 4 -> 8)
    assert (a.megatron_groups(4), a.megatron_heads(4), a.padded_groups(4)) == (4, 8, 2)
    assert (a.megatron_groups(2), a.megatron_heads(2), a.padded_groups(2)) == (2, 4, 0)
    with pytest.raises(ConfigError, match="does not divide ffn_hidden_size=128"):
        a.check_parallel(3, 1)
    with pytest.raises(ConfigError, match="num_layers=2"):
        a.check_parallel(1, 3)
    smol = ModelArch(
        num_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_kv_heads=3,
        head_dim=64,
        ffn_hidden_size=1536,
        vocab_size=49152,
        family="llama",
        qk_norm=False,
    )
    smol.check_parallel(2, 1)
    assert (smol.megatron_groups(2), smol.megatron_heads(2), smol.megatron_groups(3)) == (4, 12, 3)


def test_precision_fields(monkeypatch):
    assert precision.precision_fields(ModelConfig()) == {"params_dtype": torch.float32, "pipeline_dtype": torch.float32}
    f = precision.precision_fields(ModelConfig(precision="bf16", params_dtype="bf16"))
    assert f == {"bf16": True, "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16}
    fp8 = ModelConfig(precision="fp8", fp8_format="e4m3", fp8_recipe="blockwise")
    monkeypatch.setattr(precision, "te_available", lambda: False)
    with pytest.raises(ConfigError, match="Transformer Engine"):
        precision.precision_fields(fp8)
    monkeypatch.setattr(precision, "te_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_capability", lambda: (8, 0))
    with pytest.raises(ConfigError, match="capability 8.0"):
        precision.precision_fields(fp8)
    monkeypatch.setattr(precision, "cuda_capability", lambda: (9, 0))
    f = precision.precision_fields(fp8)
    assert f["fp8"] == "e4m3" and f["fp8_recipe"] == "blockwise" and f["bf16"] and f["params_dtype"] == torch.bfloat16
    # every key is a real TransformerConfig field of the installed megatron-core
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {x.name for x in dataclasses.fields(TransformerConfig)}
    assert set(f) <= fields


def test_transformer_config_fields():
    a = PRESETS["qwen3_tiny"]
    c = transformer_config(a, ModelConfig(recompute="full"), tp=2, pp=2)
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == (2, 64, 4, 2, 16)
    assert c.qk_layernorm and c.gated_linear_unit and not c.add_bias_linear and c.normalization == "RMSNorm"
    assert c.tensor_model_parallel_size == 2 and c.pipeline_model_parallel_size == 2
    assert c.pipeline_dtype == torch.float32 and c.recompute_granularity == "full"
    assert not transformer_config(PRESETS["llama_tiny"], ModelConfig(), 1, 1).qk_layernorm
    c4 = transformer_config(a, ModelConfig(), tp=4, pp=1)  # 2 KV groups padded to 4 at TP=4
    assert (c4.num_attention_heads, c4.num_query_groups, c4.kv_channels) == (8, 4, 16)
    with pytest.raises(ConfigError, match="ffn_hidden_size"):
        transformer_config(a, ModelConfig(), tp=3, pp=1)
