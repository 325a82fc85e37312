"""Offline conversion Hugging Face <-> Megatron checkpoint, streaming, in one process.

hf-to-megatron writes each rank file of the target TP x PP from the mapping (no process group, no model
instance): for rank (tp_rank, pp_rank) every parameter of the stage is read from safetensors, cut to the
TP shard and kept until the rank file is written. Peak memory ~ one rank file (the whole model at
TP = PP = 1) plus one source tensor. megatron-to-hf rebuilds one Hugging Face tensor at a time from the
memory-mapped rank files and flushes a safetensors shard whenever it reaches `max_shard_bytes`.
Dtypes are preserved both ways, so HF -> Megatron -> HF is bit-identical.
Both write into a temporary folder renamed on success (utils.atomic.atomic_dir).
"""

from __future__ import annotations

import logging
import os

import torch

from ..models.arch import ModelArch
from ..utils.atomic import atomic_dir
from .formats import open_source
from .hf_io import HFSource, source_dtype, write_hf_folder
from .layout import emitters, shard_from_hf
from .megatron_format import (
    TOKENIZER_DIR,
    build_metadata,
    copy_tokenizer_files,
    rank_file,
    rank_state_dict,
    write_common,
    write_rank_file,
)
from .metadata import META_FILE

log = logging.getLogger(__name__)


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, overwrite: bool = False) -> str:
    """Convert a Hugging Face Qwen3/Llama folder into a Megatron-LM per-rank checkpoint at TP x PP."""
    hf_dir = os.path.abspath(hf_dir)
    arch = ModelArch.from_hf_config(hf_dir)
    arch.check_parallel(tp, pp, keys=("--tp", "--pp"))
    src = HFSource(hf_dir)
    src.validate(arch)
    dtype = source_dtype(src)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for pp_rank in range(pp):
            for tp_rank in range(tp):

                def tensor_of(local, pm, r=tp_rank):
                    return shard_from_hf(pm, src.fetch(pm.hf_names), arch, tp, r)

                sd = rank_state_dict(arch, pp, pp_rank, tensor_of)
                write_rank_file(rank_file(tmp, tp_rank, pp_rank, pp), sd)
                del sd
                log.info("wrote rank file tp %d/%d pp %d/%d", tp_rank, tp, pp_rank, pp)
        write_common(
            tmp, build_metadata(arch, tp, pp, dtype, {"source": {"kind": "huggingface", "path": hf_dir}}), hf_dir
        )
    return os.path.abspath(out_dir)


def megatron_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 1024**3, overwrite: bool = False) -> str:
    """Convert a checkpoint written by hf_to_megatron / save_model_checkpoint into a Hugging Face folder.

    Output: model-0000i-of-0000n.safetensors + model.safetensors.index.json + config.json (+ tokenizer files
    and generation_config.json when the checkpoint carries them): loadable by
    transformers.AutoModelForCausalLM.from_pretrained (and so by vLLM).
    """
    src = open_source(ckpt_dir)
    arch = src.arch
    dtype = getattr(torch, src.meta["dtype"])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tensors = ((n, t) for pm in emitters(arch) for n, t in zip(pm.hf_names, src.fetch(pm.hf_names)))
        write_hf_folder(tmp, arch, dtype, tensors, max_shard_bytes, where=ckpt_dir)
        src.close()
        tok = os.path.join(src.dir, TOKENIZER_DIR)
        if os.path.isdir(tok):
            copy_tokenizer_files(tok, tmp)
    return os.path.abspath(out_dir)


__all__ = ["hf_to_megatron", "megatron_to_hf", "META_FILE"]
