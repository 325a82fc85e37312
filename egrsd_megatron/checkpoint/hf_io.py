"""Hugging Face folders on disk: read tensors one at a time (`HFSource`) and write sharded safetensors
(`write_hf_folder`). No Megatron here: the per-tensor layout is `layout.py`, the resharding `reshard.py`.

Reading opens each file anew per read, so no memory map outlives a read (peak RSS ~ one tensor).
Writing flushes a safetensors shard whenever it reaches `max_shard_bytes` and writes the index and
config.json, so the folder loads with `AutoModelForCausalLM.from_pretrained` (and vLLM).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.arch import ModelArch
from ..utils.atomic import atomic_write_json
from ..utils.errors import InputError, MissingInputError
from .layout import hf_shapes

__all__ = ["HFSource", "source_dtype", "write_hf_folder"]

# Tolerated extra tensors: buffers some exporters write (RoPE inverse frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class HFSource:
    """Tensors of a Hugging Face folder (model.safetensors or a sharded index), read one at a time; a
    TensorSource. `validate(arch)` checks names and shapes against the architecture before anything is copied.
    """

    def __init__(self, hf_dir: str) -> None:
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
            raise MissingInputError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                f"(save the model with save_pretrained(..., safe_serialization=True))"
            )
        for fn in set(self.file_of.values()):
            if not os.path.isfile(fn):
                raise MissingInputError(f"{index}: lists {os.path.basename(fn)}, which is missing in {self.dir}")

    def shape(self, name: str) -> Tuple[int, ...]:
        with safe_open(self.file_of[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def validate(self, arch: ModelArch, config_path: Optional[str] = None) -> None:
        expected = hf_shapes(arch)
        cfg = config_path or os.path.join(self.dir, "config.json")
        missing = [n for n in expected if n not in self.file_of]
        if missing:
            raise InputError(
                f"{self.index_file}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                f"({len(missing)} in all) that the architecture in {cfg} needs: the weights do not "
                f"match the config"
            )
        extra = [
            n
            for n in self.file_of
            if n not in expected
            and not n.endswith(_IGNORED_SUFFIXES)
            and not (arch.tie_word_embeddings and n == "lm_head.weight")
        ]
        if extra:
            raise InputError(
                f"{self.index_file}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                f"({len(extra)} in all) for the architecture in {cfg} (family {arch.family}, "
                f"{arch.num_layers} layers, qk_norm={arch.qk_norm}, tied={arch.tie_word_embeddings})"
            )
        for n, shp in expected.items():
            got = self.shape(n)
            if got != shp:
                raise InputError(
                    f"{self.file_of[n]}: tensor {n} has shape {list(got)} but the config {cfg} implies "
                    f"{list(shp)}: the config does not match the weights"
                )

    def fetch(self, hf_names: Sequence[str]) -> List[torch.Tensor]:
        out = []
        for n in hf_names:
            if n not in self.file_of:
                raise InputError(f"{self.index_file}: tensor {n} is missing")
            with safe_open(self.file_of[n], framework="pt") as f:
                out.append(f.get_tensor(n))
        return out


def source_dtype(src: HFSource) -> torch.dtype:
    """The one dtype (F32 / BF16 / F16) all tensors of the folder share; InputError naming examples if not."""
    seen = set()
    for fn in sorted(set(src.file_of.values())):
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                seen.add((f.get_slice(k).get_dtype(), fn, k))
    kinds = {d for d, _, _ in seen}
    if len(kinds) != 1 or next(iter(kinds)) not in _ST_DTYPES:
        example = {d: (os.path.basename(fn), k) for d, fn, k in seen}
        raise InputError(
            f"{src.dir}: tensors must share one dtype of F32/BF16/F16, found {example} (dtype: (file, example tensor))"
        )
    return _ST_DTYPES[next(iter(kinds))]


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


def write_hf_folder(
    out_dir: str,
    arch: ModelArch,
    dtype: torch.dtype,
    named_tensors: Iterable[Tuple[str, torch.Tensor]],
    max_shard_bytes: int = 1024**3,
    where: str = "",
) -> None:
    """Write model-0000i-of-0000n.safetensors + model.safetensors.index.json + config.json into the existing
    folder `out_dir` from (HF name, full tensor) pairs given in `hf_shapes(arch)` order, holding at most one
    shard's tensors. `where` names the source in shape errors."""
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = hf_shapes(arch)
    sizes = [(n, elem * int(torch.tensor(s).prod())) for n, s in shapes.items()]
    plan = _plan_shards(sizes, max_shard_bytes)
    fname = {n: f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i, names in enumerate(plan) for n in names}
    shard_end = {names[-1]: i for i, names in enumerate(plan)}
    pending: Dict[str, torch.Tensor] = {}
    for n, t in named_tensors:
        if tuple(t.shape) != shapes[n]:
            raise ValueError(f"{where}: rebuilt {n} has shape {list(t.shape)}, expected {list(shapes[n])}")
        pending[n] = t.contiguous()
        if n in shard_end:
            save_file(pending, os.path.join(out_dir, fname[n]), metadata={"format": "pt"})
            pending = {}
    assert not pending, "shard plan covers every tensor"
    total = sum(s for _, s in sizes)
    atomic_write_json(
        os.path.join(out_dir, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": fname}
    )
    atomic_write_json(os.path.join(out_dir, "config.json"), arch.to_hf_config(dtype=str(dtype).replace("torch.", "")))
