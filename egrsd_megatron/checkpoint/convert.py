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
from typing import Dict, List

import torch

from ..models.arch import ModelArch
from ..utils.atomic import atomic_dir, atomic_write_json
from .hf_mapping import HFSource
from .layout import emitters, hf_shapes, shard_from_hf
from .megatron_format import (META_FILE, TOKENIZER_DIR, MegatronSource, build_metadata, copy_tokenizer_files,
                              rank_file, rank_state_dict, write_common, write_rank_file)
from ..utils.errors import InputError

log = logging.getLogger(__name__)

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _source_dtype(src: HFSource) -> torch.dtype:
    from safetensors import safe_open
    seen = set()
    for fn in sorted(set(src.file_of.values())):
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                seen.add((f.get_slice(k).get_dtype(), fn, k))
    kinds = {d for d, _, _ in seen}
    if len(kinds) != 1 or next(iter(kinds)) not in _ST_DTYPES:
        example = {d: (os.path.basename(fn), k) for d, fn, k in seen}
        raise InputError(f"{src.dir}: tensors must share one dtype of F32/BF16/F16, found {example} "
                         f"(dtype: (file, example tensor))")
    return _ST_DTYPES[next(iter(kinds))]


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, overwrite: bool = False) -> str:
    """Convert a Hugging Face Qwen3/Llama folder into a Megatron-LM per-rank checkpoint at TP x PP."""
    hf_dir = os.path.abspath(hf_dir)
    arch = ModelArch.from_hf_config(hf_dir)
    arch.check_parallel(tp, pp, keys=("--tp", "--pp"))
    src = HFSource(hf_dir)
    src.validate(arch)
    dtype = _source_dtype(src)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                sd = rank_state_dict(arch, pp, pp_rank,
                                     lambda local, pm: shard_from_hf(pm, src.fetch(pm.hf_names), arch, tp, tp_rank))
                write_rank_file(rank_file(tmp, tp_rank, pp_rank, pp), sd)
                del sd
                log.info("wrote rank file tp %d/%d pp %d/%d", tp_rank, tp, pp_rank, pp)
        write_common(tmp, build_metadata(arch, tp, pp, dtype, {"source": {"kind": "huggingface", "path": hf_dir}}),
                     hf_dir)
    return os.path.abspath(out_dir)


def _plan_shards(names_sizes: List[tuple], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name, nbytes in names_sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def megatron_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 1024**3, overwrite: bool = False) -> str:
    """Convert a checkpoint written by hf_to_megatron / save_model_checkpoint into a Hugging Face folder.

    Output: model-0000i-of-0000n.safetensors + model.safetensors.index.json + config.json (+ tokenizer files
    and generation_config.json when the checkpoint carries them): loadable by
    transformers.AutoModelForCausalLM.from_pretrained (and so by vLLM).
    """
    from safetensors.torch import save_file
    src = MegatronSource(ckpt_dir)
    arch = src.arch
    dtype = getattr(torch, src.meta["dtype"])
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = hf_shapes(arch)
    sizes = [(n, elem * int(torch.tensor(s).prod())) for n, s in shapes.items()]
    plan = _plan_shards(sizes, max_shard_bytes)
    fname = {n: f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i, names in enumerate(plan) for n in names}
    shard_end = {names[-1]: i for i, names in enumerate(plan)}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        pending: Dict[str, torch.Tensor] = {}
        for pm in emitters(arch):
            for n, t in zip(pm.hf_names, src.fetch(pm.hf_names)):
                if tuple(t.shape) != shapes[n]:
                    raise ValueError(f"{ckpt_dir}: rebuilt {n} has shape {list(t.shape)}, expected {list(shapes[n])}")
                pending[n] = t.contiguous()
                if n in shard_end:
                    save_file(pending, os.path.join(tmp, fname[n]), metadata={"format": "pt"})
                    pending = {}
        src.close()
        assert not pending, "shard plan covers every tensor"
        total = sum(s for _, s in sizes)
        atomic_write_json(os.path.join(tmp, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": fname})
        atomic_write_json(os.path.join(tmp, "config.json"), arch.to_hf_config(dtype=str(dtype).replace("torch.", "")))
        tok = os.path.join(src.dir, TOKENIZER_DIR)
        if os.path.isdir(tok):
            copy_tokenizer_files(tok, tmp)
    return os.path.abspath(out_dir)


__all__ = ["hf_to_megatron", "megatron_to_hf", "META_FILE"]
