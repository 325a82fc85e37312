"""Resharding: Hugging Face-named full tensors <-> this rank's shard of a live (TP/PP-sharded) GPTModel.

- `load_from_source(model, arch, source, ...)`: from any TensorSource (source.py), each rank takes only
  the tensors its PP stage needs and copies its TP shard; one parameter's source tensors at a time.
- `load_hf_weights(model, arch, hf_dir)`: the same from a Hugging Face folder (hf_io.HFSource), validated first.
- `gather_hf_state_dict(model, arch)`: collective over the model-parallel group; yields full, unpadded,
  Hugging Face-named tensors, identical on every rank (refit of generation engines; megatron-to-hf).
The per-tensor layout (how one HF tensor splits into TP shards) lives in `layout.py`.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist

from ..models.arch import ModelArch
from .hf_io import HFSource
from .layout import (
    EMBED,
    ParamMap,
    canonical_local_name,
    emitters,
    hf_from_shards,
    hf_shapes,
    output_param,
    shard_from_hf,
    stage_of,
    stage_params,
)
from .source import TensorSource

__all__ = ["gather_hf_state_dict", "load_from_source", "load_hf_weights", "model_params_by_canonical_name"]


def model_params_by_canonical_name(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    return {canonical_local_name(n): p for n, p in model.named_parameters()}


def load_from_source(
    model: torch.nn.Module, arch: ModelArch, source: TensorSource, tp: int, tp_rank: int, pp: int, pp_rank: int
) -> int:
    """Copy this rank's shard of every parameter of its stage from `source.fetch(hf_names)`; returns the count.

    Errors name the Megatron parameter when the model and the mapping disagree (wrong arch for the model).
    """
    params = model_params_by_canonical_name(model)
    wanted = stage_params(arch, pp, pp_rank)
    names = {ln for ln, _ in wanted}
    stray = sorted(set(params) - names)
    if stray:
        raise ValueError(
            f"model parameter(s) {stray[:5]} have no Hugging Face source in the {arch.family} mapping: "
            f"the model was not built from this architecture"
        )
    with torch.no_grad():
        for local, pm in wanted:
            if local not in params:
                raise ValueError(
                    f"the model on PP stage {pp_rank} has no parameter {local}: it was built for "
                    f"another architecture or TP/PP layout"
                )
            p = params[local]
            shard = shard_from_hf(pm, source.fetch(pm.hf_names), arch, tp, tp_rank)
            if tuple(shard.shape) != tuple(p.shape):
                raise ValueError(
                    f"{pm.hf_names}: TP shard {tp_rank}/{tp} for {local} has shape {list(shard.shape)}, "
                    f"the model parameter has {list(p.shape)}"
                )
            p.copy_(shard)
    return len(wanted)


def mp_layout() -> Tuple[int, int, int, int]:
    """(TP, TP rank, PP, PP rank) of this process from Megatron's parallel_state."""
    # Imported here: megatron.core takes seconds to import, and the offline converter and `egrsd eval`
    # (which import this package) never need it.
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
    )


def load_hf_weights(model: torch.nn.Module, arch: ModelArch, hf_dir: str) -> None:
    """Load a Hugging Face checkpoint into this rank's model chunk (TP/PP from Megatron's parallel_state).

    Names and shapes are validated against `arch` first (errors name the tensor and file); then each
    parameter of this stage is read, sliced to this TP rank and copied in.
    """
    src = HFSource(hf_dir)
    src.validate(arch)
    tp, tp_rank, pp, pp_rank = mp_layout()
    load_from_source(model, arch, src, tp, tp_rank, pp, pp_rank)


def gather_hf_state_dict(
    model: torch.nn.Module, arch: ModelArch, grads: bool = False
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, full tensor) for every HF tensor; COLLECTIVE over TP and PP groups.

    Every rank of the model-parallel group must iterate it to the end (same order everywhere). Tensors are
    unpadded and identical on all ranks. With grads=True the parameters' raw `.grad` (as left by backward,
    before Megatron's finalize_model_grads) are gathered instead: q/k-norm gradients are summed over TP
    (each rank saw only its heads) and, for tied embeddings at PP > 1, the first stage's embedding gradient
    and the last stage's output-layer gradient are summed, as Hugging Face's single tied tensor sees them.
    """
    from megatron.core import parallel_state as ps  # see mp_layout: seconds to import, not needed offline

    tp, tp_rank, pp, pp_rank = mp_layout()
    params = model_params_by_canonical_name(model)
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    shapes = hf_shapes(arch)
    n_per = arch.num_layers // pp
    # Each Megatron parameter's dtype, known on every stage (a stage that does not hold a tensor receives it
    # into a buffer of the owner's dtype): bf16 models keep fp32 norm weights with Megatron's torch norms.
    dtypes: Dict[str, torch.dtype] = {}
    if pp > 1:
        mine = {pm.mname: str(params[local].dtype) for local, pm in stage_params(arch, pp, pp_rank)}
        parts: List[Dict[str, str]] = [{} for _ in range(pp)]
        dist.all_gather_object(parts, mine, group=pp_group)
        dtypes = {k: getattr(torch, v.replace("torch.", "")) for part in parts for k, v in part.items()}

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
        full = (
            local_full(pm)
            if pp_rank == owner
            else [torch.empty(shapes[n], dtype=dtypes.get(pm.mname, dtype), device=device) for n in pm.hf_names]
        )
        if pp > 1:
            for t in full:
                dist.broadcast(t, src=pp_ranks[owner], group=pp_group)
        return full

    for pm in emitters(arch):
        tensors = from_stage(pm, stage_of(pm, arch, pp))
        if grads and pm.mname == EMBED.mname and arch.tie_word_embeddings and pp > 1:
            tensors = [tensors[0] + from_stage(output_param(arch), pp - 1)[0]]
        yield from zip(pm.hf_names, tensors)
