"""The hf engine's dtype comes from one place (rollout/footprint.py): the engine built here and the planner's
count of it agree, in bytes, for the same config."""

from __future__ import annotations

import pytest
import torch

from egrsd_megatron.config import load_config
from egrsd_megatron.models import resolve_arch
from egrsd_megatron.planner import PlanSettings, plan
from egrsd_megatron.rollout import make_engine
from egrsd_megatron.rollout.footprint import engine_weight_bytes, engine_weight_dtype


def _built(cfg):
    arch = resolve_arch(cfg.model)
    engine = make_engine(cfg.rollout, arch.to_hf_config(), tokenizer=None)
    return arch, engine.model


def _kv_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the KV cache the hf engine decodes with (one cached forward, as HFEngine._forward)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, past_key_values=cache)
    return cache.layers[0].keys.dtype


@pytest.mark.parametrize("hf_dtype", ["bfloat16", "float32"])
def test_planner_counts_the_hf_engine_it_builds(hf_dtype):
    cfg = load_config("tiny_cpu", [f"rollout.hf_dtype={hf_dtype}"])
    arch, model = _built(cfg)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[hf_dtype]
    assert {p.dtype for p in model.parameters()} == {dtype} and _kv_dtype(model) == dtype
    built_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    # The planner plans a GPU run; with rollout.hf_dtype set the dtype is the same on every device.
    p = plan(cfg, arch, nodes=1, gpus_per_node=1, settings=PlanSettings(seq_len=64))
    assert p.static["rollout engine weights"] == built_bytes == engine_weight_bytes(cfg.rollout, arch.num_params())
    assert engine_weight_dtype(cfg.rollout, "cuda") == engine_weight_dtype(cfg.rollout, "cpu") == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default; a GPU builds bf16 (gpu_check)")
def test_unset_hf_dtype_is_fp32_on_cpu_and_bf16_in_the_gpu_plan():
    cfg = load_config("tiny_cpu")
    assert cfg.rollout.hf_dtype is None
    arch, model = _built(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32} == {engine_weight_dtype(cfg.rollout, "cpu")}
    # The plan is of a GPU run, where the same unset key builds bf16: 2 bytes per parameter.
    p = plan(cfg, arch, nodes=1, gpus_per_node=1, settings=PlanSettings(seq_len=64))
    assert engine_weight_dtype(cfg.rollout, "cuda") == torch.bfloat16
    assert p.static["rollout engine weights"] == arch.num_params() * 2
