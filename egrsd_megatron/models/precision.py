"""`model.precision` (+ params_dtype, fp8 format/recipe) -> Megatron-Core TransformerConfig keyword arguments.

Field names checked against megatron-core 0.16.1 (ModelParallelConfig.params_dtype / bf16 /
pipeline_dtype; TransformerConfig.fp8 ("e4m3" | "hybrid") and fp8_recipe ("delayed" | "tensorwise" |
"blockwise" | ...)). FP8 runs only through Transformer Engine on a Hopper-or-newer GPU (compute capability
>= 9.0): asking for it anywhere else is an error before any model is built, never a silent fallback.
FP8 compute keeps bf16 params and bf16 for everything TE does not run in FP8 (norms, softmax, embeddings).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, Optional, Tuple

import torch

from ..config.schema import ConfigError, ModelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def te_available() -> bool:
    """Transformer Engine importable (checked by spec: importing a broken TE install breaks Megatron imports)."""
    return importlib.util.find_spec("transformer_engine") is not None


def cuda_capability() -> Optional[Tuple[int, int]]:
    """Compute capability of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def params_dtype(model_cfg: ModelConfig) -> torch.dtype:
    if model_cfg.params_dtype not in _DTYPES:
        raise ConfigError(f"config key 'model.params_dtype': got {model_cfg.params_dtype!r}; expected fp32 or bf16")
    return _DTYPES[model_cfg.params_dtype]


def precision_fields(model_cfg: ModelConfig) -> Dict[str, Any]:
    """TransformerConfig kwargs for the compute precision.

    fp32 -> {}; bf16 -> {bf16: True}; fp8 -> {bf16: True, fp8: <format>, fp8_recipe: <recipe>}.
    `params_dtype` / `pipeline_dtype` come from model.params_dtype (fp8 forces bf16 params: TE keeps FP8
    copies of the GEMM weights itself).
    """
    p = model_cfg.precision
    dt = params_dtype(model_cfg)
    if p == "fp32":
        return {"params_dtype": dt, "pipeline_dtype": dt}
    if p == "bf16":
        return {"bf16": True, "params_dtype": dt, "pipeline_dtype": dt}
    if p == "fp8":
        if not te_available():
            raise ConfigError(
                "config key 'model.precision': fp8 needs Transformer Engine, which is not installed "
                "here (CPU machines cannot have it); use precision=bf16 or fp32, or run on a GPU node "
                "with transformer-engine"
            )
        cap = cuda_capability()
        if cap is None or cap < (9, 0):
            raise ConfigError(
                f"config key 'model.precision': fp8 needs a Hopper-or-newer GPU (compute capability "
                f">= 9.0); found {'no CUDA device' if cap is None else f'capability {cap[0]}.{cap[1]}'}"
                f"; use precision=bf16"
            )
        return {
            "bf16": True,
            "params_dtype": torch.bfloat16,
            "pipeline_dtype": torch.bfloat16,
            "fp8": model_cfg.fp8_format,
            "fp8_recipe": model_cfg.fp8_recipe,
        }
    raise ConfigError(f"config key 'model.precision': got {p!r}; expected fp32, bf16 or fp8")
