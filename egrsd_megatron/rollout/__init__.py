"""Rollout generation behind one interface: `make_engine(rollout_cfg, ...)` picks `hf` or `vllm`."""

from __future__ import annotations

from typing import Any, Dict, Optional

from .base import Completion, RolloutEngine, SamplingParams, row_seed, stable_seed

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_engine", "row_seed", "stable_seed"]


def make_engine(
    rollout_cfg: Any, hf_config: Dict[str, Any], tokenizer: Any, weights_dir: Optional[str] = None
) -> RolloutEngine:
    """The engine named by `rollout_cfg.engine` ("hf" | "vllm"), built from a HF config dict (random
    weights, to be refitted with `update_weights`) or loaded from `weights_dir` (a HF folder)."""
    name = getattr(rollout_cfg, "engine", "hf")
    if name == "hf":
        from .hf_engine import make_hf_engine

        return make_hf_engine(rollout_cfg, hf_config, tokenizer, weights_dir)
    if name == "vllm":
        from .vllm_engine import make_vllm_engine

        return make_vllm_engine(rollout_cfg, hf_config, tokenizer, weights_dir)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; expected hf or vllm")
