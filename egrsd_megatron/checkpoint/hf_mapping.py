"""Hugging Face safetensors <-> a live (TP/PP-sharded) Megatron GPTModel.

- `load_hf_weights(model, arch, hf_dir)`: each rank reads only the tensors its PP stage needs and copies
  its TP shard; nothing but one parameter's source tensors is held at a time (streaming).
- `gather_hf_state_dict(model, arch)`: collective over the model-parallel group; yields full, unpadded,
  Hugging Face-named tensors, identical on every rank (refit of generation engines; megatron-to-hf).
The per-tensor layout lives in `layout.py` (re-exported here: `shard_from_hf`, `hf_from_shards`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..models.arch import ModelArch
from .layout import (EMBED, ParamMap, canonical_local_name, emitters, hf_from_shards, hf_shapes, output_param,
                     shard_from_hf, stage_of, stage_params)
from ..utils.errors import InputError, MissingInputError

__all__ = ["HFSource", "load_hf_weights", "load_from_source", "gather_hf_state_dict", "shard_from_hf",
           "hf_from_shards", "model_params_by_canonical_name"]

# Tolerated extra tensors: buffers some exporters write (RoPE inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFSource:
    """Tensors of a Hugging Face folder (model.safetensors or a sharded index), read one at a time.

    Each read opens the file anew so no memory map outlives the read (keeps peak RSS ~ one tensor).
    `validate(arch)` checks names and shapes against the architecture before anything is copied.
    """

    def __init__(self, hf_dir: str) -> None:
        from safetensors import safe_open
        self.dir = os.path.abspath(hf_dir)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                wm = json.load(f).get("weight_map")
            if not isinstance(wm, dict):
                raise InputError(f"{index}: no 'weight_map' object")
            self.file_of: Dict[str, str] = {k: os.path.join(self.dir, v) for k, v in wm.items()}
            self.index_file = index
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.file_of = {k: single for k in f.keys()}
            self.index_file = single
        else:
            raise MissingInputError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                                    f"(save the model with save_pretrained(..., safe_serialization=True))")
        for fn in set(self.file_of.values()):
            if not os.path.isfile(fn):
                raise MissingInputError(f"{index}: lists {os.path.basename(fn)}, which is missing in {self.dir}")

    def shape(self, name: str) -> Tuple[int, ...]:
        from safetensors import safe_open
        with safe_open(self.file_of[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def validate(self, arch: ModelArch, config_path: Optional[str] = None) -> None:
        expected = hf_shapes(arch)
        cfg = config_path or os.path.join(self.dir, "config.json")
        missing = [n for n in expected if n not in self.file_of]
        if missing:
            raise InputError(f"{self.index_file}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"({len(missing)} in all) that the architecture in {cfg} needs: the weights do not "
                             f"match the config")
        extra = [n for n in self.file_of if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                 and not (arch.tie_word_embeddings and n == "lm_head.weight")]
        if extra:
            raise InputError(f"{self.index_file}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                             f"({len(extra)} in all) for the architecture in {cfg} (family {arch.family}, "
                             f"{arch.num_layers} layers, qk_norm={arch.qk_norm}, tied={arch.tie_word_embeddings})")
        for n, shp in expected.items():
            got = self.shape(n)
            if got != shp:
                raise InputError(f"{self.file_of[n]}: tensor {n} has shape {list(got)} but the config {cfg} implies "
                                 f"{list(shp)}: the config does not match the weights")

    def fetch(self, hf_names: Sequence[str]) -> List[torch.Tensor]:
        from safetensors import safe_open
        out = []
        for n in hf_names:
            if n not in self.file_of:
                raise InputError(f"{self.index_file}: tensor {n} is missing")
            with safe_open(self.file_of[n], framework="pt") as f:
                out.append(f.get_tensor(n))
        return out


def model_params_by_canonical_name(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {canonical_local_name(n): p for n, p in model.named_parameters()}


def load_from_source(model: torch.nn.Module, arch: ModelArch, source, tp: int, tp_rank: int, pp: int,
                     pp_rank: int) -> int:
    """Copy this rank's shard of every parameter of its stage from `source.fetch(hf_names)`; returns the count.

    Errors name the Megatron parameter when the model and the mapping disagree (wrong arch for the model).
    """
    params = model_params_by_canonical_name(model)
    wanted = stage_params(arch, pp, pp_rank)
    names = {ln for ln, _ in wanted}
    stray = sorted(set(params) - names)
    if stray:
        raise ValueError(f"model parameter(s) {stray[:5]} have no Hugging Face source in the {arch.family} mapping: "
                         f"the model was not built from this architecture")
    with torch.no_grad():
        for local, pm in wanted:
            if local not in params:
                raise ValueError(f"the model on PP stage {pp_rank} has no parameter {local}: it was built for "
                                 f"another architecture or TP/PP layout")
            p = params[local]
            shard = shard_from_hf(pm, source.fetch(pm.hf_names), arch, tp, tp_rank)
            if tuple(shard.shape) != tuple(p.shape):
                raise ValueError(f"{pm.hf_names}: TP shard {tp_rank}/{tp} for {local} has shape {list(shard.shape)}, "
                                 f"the model parameter has {list(p.shape)}")
            p.copy_(shard)
    return len(wanted)


def _mp_layout() -> Tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())


def load_hf_weights(model: torch.nn.Module, arch: ModelArch, hf_dir: str) -> None:
    """Load a Hugging Face checkpoint into this rank's model chunk (TP/PP from Megatron's parallel_state).

    Names and shapes are validated against `arch` first (errors name the tensor and file); then each
    parameter of this stage is read, sliced to this TP rank and copied in.
    """
    src = HFSource(hf_dir)
    src.validate(arch)
    tp, tp_rank, pp, pp_rank = _mp_layout()
    load_from_source(model, arch, src, tp, tp_rank, pp, pp_rank)


def gather_hf_state_dict(model: torch.nn.Module, arch: ModelArch, grads: bool = False
                         ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, full tensor) for every HF tensor; COLLECTIVE over TP and PP groups.

    Every rank of the model-parallel group must iterate it to the end (same order everywhere). Tensors are
    unpadded and identical on all ranks. With grads=True the parameters' raw `.grad` (as left by backward,
    before Megatron's finalize_model_grads) are gathered instead: q/k-norm gradients are summed over TP
    (each rank saw only its heads) and, for tied embeddings at PP > 1, the first stage's embedding gradient
    and the last stage's output-layer gradient are summed, as Hugging Face's single tied tensor sees them.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    tp, tp_rank, pp, pp_rank = _mp_layout()
    params = model_params_by_canonical_name(model)
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    shapes = hf_shapes(arch)
    n_per = arch.num_layers // pp

    def local_full(pm: ParamMap) -> List[torch.Tensor]:
        """Full HF tensors of pm from this stage's TP shards (call only on the owning stage)."""
        off = n_per * pp_rank
        p = params[pm.local_name(off)]
        t = p.grad if grads else p.data
        if t is None:
            t = torch.zeros_like(p.data)
        t = t.detach()
        if tp == 1:
            return hf_from_shards(pm, [t], arch)
        if pm.kind == "qknorm" and grads:
            t = t.clone()
            dist.all_reduce(t, group=tp_group)
            return [t]
        if pm.kind == "rep":
            return [t.clone()]
        shards = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(shards, t.contiguous(), group=tp_group)
        return hf_from_shards(pm, shards, arch)

    def from_stage(pm: ParamMap, owner: int) -> List[torch.Tensor]:
        full = local_full(pm) if pp_rank == owner else [torch.empty(shapes[n], dtype=dtype, device=device)
                                                       for n in pm.hf_names]
        if pp > 1:
            for t in full:
                dist.broadcast(t, src=pp_ranks[owner], group=pp_group)
        return full

    for pm in emitters(arch):
        tensors = from_stage(pm, stage_of(pm, arch, pp))
        if grads and pm.mname == EMBED.mname and arch.tie_word_embeddings and pp > 1:
            tensors = [tensors[0] + from_stage(output_param(arch), pp - 1)[0]]
        for n, t in zip(pm.hf_names, tensors):
            yield n, t
