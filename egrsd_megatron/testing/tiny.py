"""A random tiny Qwen3 saved as a Hugging Face folder with the byte-level tokenizer.

Used by tests (a common starting point for TP=1/2/PP=2 runs) and by `make demo QUICK=1`.
"""
from __future__ import annotations

import os


def save_tiny_hf_model(out_dir: str, preset: str = "qwen3_tiny_chat", seed: int = 0) -> str:
    """Write (once) a randomly initialised HF model of `preset` + byte tokenizer to `out_dir`; return it."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import ModelConfig
    from ..data.byte_tokenizer import byte_tokenizer
    from ..models import resolve_arch
    from ..utils import atomic_dir
    torch.manual_seed(seed)
    hf = resolve_arch(ModelConfig(preset=preset)).to_hf_config()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
    return out_dir
