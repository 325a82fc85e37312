"""Random tiny Hugging Face models for tests and `make demo QUICK=1`.

`save_random_hf_model`: any ModelArch as a transformers checkpoint (norm weights optionally randomised
too, since all-ones norms would hide a q/k-norm or norm mix-up in a mapping test).
`save_tiny_hf_model`: the tiny Qwen3 with the byte-level tokenizer, written once and reused: a common
starting point for TP=1/2/PP=2 training runs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..data.byte_tokenizer import byte_tokenizer
from ..models import resolve_arch
from ..utils import atomic_dir


def save_random_hf_model(
    arch: Any, out_dir: str, seed: int = 0, randomize_norms: bool = False, tokenizer: Optional[Any] = None
) -> str:
    """Write a randomly initialised transformers model of `arch` (a ModelArch) to `out_dir`; return it."""
    # lazy: transformers takes seconds to import; tests that only need the package's other helpers skip it.
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = arch.to_hf_config()
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if randomize_norms:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.5 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_hf_model(out_dir: str, preset: str = "qwen3_tiny_chat", seed: int = 0) -> str:
    """Write (once) a randomly initialised HF model of `preset` + byte tokenizer to `out_dir`; return it."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    with atomic_dir(out_dir, overwrite=True) as tmp:
        save_random_hf_model(resolve_arch(ModelConfig(preset=preset)), tmp, seed, tokenizer=byte_tokenizer())
    return out_dir
