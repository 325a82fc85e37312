"""What a rollout engine holds in memory: the one place the engines and the planner (planner/memory.py) read.

hf engine: one unsharded copy of the model (HF_WEIGHT_COPIES) in fp32 on every device, and its KV cache in
the same dtype (transformers keeps the cache in the model's dtype). The refit streams HF-named tensors one at
a time (checkpoint gather_hf_state_dict is a generator), so it adds no second copy of the model.
vllm engine: its pre-allocated share of GPU memory (rollout.gpu_memory_utilization); its weights are
`rollout.vllm_dtype`, default bfloat16 on a GPU and float32 on CPU (exact agreement with the hf engine).
"""

from __future__ import annotations

from typing import Any

import torch

# The hf engine's weights and KV cache are fp32 on CPU and GPU alike (fp32 generation is what its tests
# compare against; bf16 hf generation was never verified).
HF_ENGINE_DTYPE = torch.float32
HF_WEIGHT_COPIES = 1

_VLLM_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def vllm_default_dtype(device: str) -> str:
    """vLLM's dtype name when rollout.vllm_dtype is unset: float32 on CPU, bfloat16 on a GPU."""
    return "float32" if device == "cpu" else "bfloat16"


def engine_weight_dtype(rollout_cfg: Any, device: str = "cuda") -> torch.dtype:
    """The dtype the engine named by `rollout_cfg.engine` holds its weights (and hf: its KV cache) in on
    `device` ("cuda" or "cpu")."""
    name = getattr(rollout_cfg, "engine", "hf")
    if name == "hf":
        return HF_ENGINE_DTYPE
    if name == "vllm":
        return _VLLM_DTYPES[getattr(rollout_cfg, "vllm_dtype", None) or vllm_default_dtype(device)]
    raise ValueError(f"rollout.engine: unknown engine {name!r}; expected hf or vllm")
