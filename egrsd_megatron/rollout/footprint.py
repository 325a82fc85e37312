"""What a rollout engine holds in memory, and in which dtype: the one place the engines and the planner
(planner/memory.py) read.

dtype (both engines): `rollout.hf_dtype` / `rollout.vllm_dtype`, or when unset the device's default:
float32 on CPU (exact agreement between the engines and with the fp32 trainer there), bfloat16 on a GPU.
hf_engine.make_hf_engine builds its model with `engine_weight_dtype(cfg, device)`; the planner counts
`engine_weight_dtype(cfg, "cuda")` (it plans GPU runs).

hf engine: one unsharded copy of the model (HF_WEIGHT_COPIES) on every device, and its KV cache in the same
dtype (transformers keeps the cache in the model's dtype). The refit streams HF-named tensors one at a time
(checkpoint gather_hf_state_dict is a generator), so it adds no second copy of the model.
vllm engine: its pre-allocated share of GPU memory (rollout.gpu_memory_utilization x the GPU's memory), of
which the weights are N_params x bytes(dtype) / rollout.vllm_tp (vLLM shards every matrix and the
vocabulary over its TP group; the replicated norms, < 0.01% of a Qwen3's parameters, are not counted again)
and the rest is its KV cache (and activation workspace). With `rollout.vllm_sleep` the engine sleeps while
the trainer runs (level 1: weights offloaded to host memory, KV cache discarded; level 2: both discarded,
the next refit brings the weights back), so its share is held only during generation
(`releases_memory_while_training`). GPU-only, unverified: how much of the share vLLM really releases
(CUDA graph pools and its allocator context stay); bench/gpu_check.py measures it.
"""

from __future__ import annotations

from typing import Any

import torch

HF_WEIGHT_COPIES = 1

# The dtype names `rollout.hf_dtype` and `rollout.vllm_dtype` accept (config/schema.py validates with it).
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype_name(device: str) -> str:
    """The engines' dtype when rollout.hf_dtype / rollout.vllm_dtype is unset: float32 on CPU, bfloat16 on
    a GPU (`device` "cpu" or "cuda")."""
    return "float32" if device == "cpu" else "bfloat16"


def engine_dtype_name(rollout_cfg: Any, device: str = "cuda") -> str:
    """The dtype name the engine named by `rollout_cfg.engine` holds its weights (and hf: its KV cache) in."""
    name = getattr(rollout_cfg, "engine", "hf")
    if name not in ("hf", "vllm"):
        raise ValueError(f"rollout.engine: unknown engine {name!r}; expected hf or vllm")
    return getattr(rollout_cfg, f"{name}_dtype", None) or default_dtype_name(device)


def engine_weight_dtype(rollout_cfg: Any, device: str = "cuda") -> torch.dtype:
    """The torch dtype of `engine_dtype_name` on `device` ("cuda" or "cpu")."""
    return DTYPES[engine_dtype_name(rollout_cfg, device)]


def engine_weight_bytes(rollout_cfg: Any, num_params: int, device: str = "cuda") -> float:
    """Bytes of the engine's weights on ONE device: hf N x HF_WEIGHT_COPIES x bytes (unsharded);
    vllm N x bytes / rollout.vllm_tp."""
    nbytes = engine_weight_dtype(rollout_cfg, device).itemsize
    if getattr(rollout_cfg, "engine", "hf") == "hf":
        return float(num_params * HF_WEIGHT_COPIES * nbytes)
    return float(num_params * nbytes) / int(getattr(rollout_cfg, "vllm_tp", 1))


def releases_memory_while_training(rollout_cfg: Any) -> bool:
    """True when the engine gives its GPU memory back between generation phases (vllm sleep mode)."""
    return getattr(rollout_cfg, "engine", "hf") == "vllm" and bool(getattr(rollout_cfg, "vllm_sleep", False))
