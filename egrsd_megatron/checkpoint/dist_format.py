"""Megatron-Core `dist_checkpointing` (torch_dist) model checkpoints: sharded, resharded on load.

Layout (one folder, as Megatron-LM's `--ckpt-format torch_dist` iteration folders are; Megatron-LM's own
loader would also want its tracker file and `args` in the common state, which are not written):
    <dir>/metadata.json, common.pt, .metadata, __<rank>_<i>.distcp   dist_checkpointing's own files
    <dir>/egrsd_checkpoint.json                                    our metadata (megatron_format.build_metadata
                                                                   with this FORMAT and the TP/PP written)
    <dir>/tokenizer/                                               tokenizer files (if any)
Keys are GPTModel.sharded_state_dict()'s: global tensors, layers stacked on a leading axis
("decoder.layers.self_attention.linear_qkv.weight" is [num_layers, ...]); a training checkpoint adds
"optimizer.state.<exp_avg|exp_avg_sq|master>.<key>" and "teacher.<key>" (dist_train_state.py). Any
process group of any TP/PP loads its own shards (`load_model_checkpoint`, Megatron's `dist_checkpointing.
load(model.sharded_state_dict(), dir)`); `DistSource` reads full tensors in one process without one.

Safe loading (no code from a checkpoint runs): torch.distributed.checkpoint unpickles `.metadata` with
plain pickle and torch's load planner unpickles every byte entry with `torch.load(weights_only=False)`;
Megatron-Core 0.16.1's common strategy reads common.pt with `torch.load(path, map_location="cpu")`, safe
only through torch >= 2.6's default weights_only=True (which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns
off). So every load here (1) unpickles `.metadata` with safe_load.load_dcp_metadata (an allowlist of torch's checkpoint
metadata classes) before dist_checkpointing sees the folder, (2) reads common.pt through safe_load.load_pt
(`safe_common_strategy`, passed to `dist_checkpointing.load`), and (3) never asks for a byte entry:
the `_extra_state` ShardedObjects (None for the local spec) are dropped from the template and set to
None, so the planner's `torch.load(weights_only=False)` is never reached. (Someone calling Megatron's
`dist_checkpointing.load(model.sharded_state_dict(), dir)` directly, as the interop test does, asks for
those byte entries and gets torch's weights_only=False unpickling of them: only for folders one trusts.)
Padded shapes: the vocabulary is padded to 128 x TP (embedding and output layer are
`allow_shape_mismatch` ShardedTensors: the rows both layouts hold are read, the rest stay zero); zero
KV groups added when TP does not divide them change the attention shapes, which cannot be resharded
(`check_reshardable` says so before any read).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..models.arch import ModelArch
from ..utils.atomic import atomic_write_json
from ..utils.errors import InputError, MissingInputError
from .layout import ParamMap, emitters, hf_from_shards
from .megatron_format import TOKENIZER_DIR, build_metadata, copy_tokenizer_files
from .metadata import META_FILE, checkpoint_arch, read_format_metadata
from .safe_load import load_dcp_metadata, load_pt

FORMAT = "megatron-core-torch-dist"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's global metadata file
EXTRA_STATE = "_extra_state"

__all__ = [
    "FORMAT",
    "DistSource",
    "safe_common_strategy",
    "check_reshardable",
    "load_model_checkpoint",
    "model_template",
    "safe_dist_load",
    "save_model_checkpoint",
    "stored_tensors",
    "write_model_metadata",
]


def _megatron():
    # lazy: megatron.core takes seconds to import; `egrsd convert megatron-to-hf` reads these folders without it
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    return dist_checkpointing, COMMON_STATE_FNAME, TorchCommonLoadStrategy


class _SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` is unpickled through the allowlist (safe_load.load_dcp_metadata)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = load_dcp_metadata(os.path.join(str(self.path), DCP_METADATA))
        if getattr(md, "storage_meta", None) is None:  # what FileSystemReader.read_metadata does too
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def stored_tensors(ckpt_dir: str) -> Dict[str, TensorStorageMetadata]:
    """{key: global shape/dtype} of the tensors in a torch_dist folder, read safely (no process group)."""
    p = os.path.join(ckpt_dir, DCP_METADATA)
    if not os.path.isfile(p):
        raise MissingInputError(f"{p} is missing: {ckpt_dir} is not a complete torch_dist checkpoint")
    md = load_dcp_metadata(p)
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def safe_common_strategy():
    """A LoadCommonStrategy for `dist_checkpointing.load`: common.pt through safe_load.load_pt."""
    _, common_fname, base = _megatron()

    class SafeCommonLoadStrategy(base):
        """Megatron's torch common strategy with common.pt read by safe_load.load_pt (weights_only=True)."""

        def load_common(self, checkpoint_dir):
            return load_pt(os.path.join(str(checkpoint_dir), common_fname), "dist_checkpointing common state")

    return SafeCommonLoadStrategy()


def _drop_objects(sharded: Dict[str, Any]) -> Dict[str, Any]:
    """The sharded state dict without its ShardedObjects (byte entries, loaded only by torch.load(
    weights_only=False)); nested dicts are walked."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject  # lazy: see _megatron

    out = {}
    for k, v in sharded.items():
        if isinstance(v, dict):
            out[k] = _drop_objects(v)
        elif not isinstance(v, ShardedObject):
            out[k] = v
    return out


def model_template(model: torch.nn.Module, prefix: str = "") -> Dict[str, Any]:
    """model.sharded_state_dict(prefix) without the `_extra_state` objects, as a load template.

    The padded-vocabulary tensors (`allow_shape_mismatch`) are zeroed first: rows the checkpoint does not
    hold (loading at a larger TP than written) stay zero, as a converted checkpoint's padding is.
    """
    sharded = _drop_objects(model.sharded_state_dict(prefix=prefix))
    with torch.no_grad():
        for v in sharded.values():
            if getattr(v, "allow_shape_mismatch", False) and v.data is not None:
                v.data.zero_()
    return sharded


def fill_extra_state(model: torch.nn.Module, loaded: Dict[str, Any]) -> Dict[str, Any]:
    """`loaded` plus the model's `_extra_state` entries as None (what the local spec's layers hold)."""
    out = dict(loaded)
    for k in model.state_dict():
        if k.endswith(EXTRA_STATE):
            out.setdefault(k, None)
    return out


def safe_dist_load(template: Dict[str, Any], ckpt_dir: str) -> Dict[str, Any]:
    """Collective: `dist_checkpointing.load(template, ckpt_dir)` after the safety checks of the module
    docstring; errors from the load name the folder."""
    dist_checkpointing, _, _ = _megatron()
    load_dcp_metadata(os.path.join(ckpt_dir, DCP_METADATA))  # refuses a foreign object before torch unpickles it
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        return dist_checkpointing.load(template, ckpt_dir, common_strategy=safe_common_strategy())
    except (CheckpointingException, KeyError) as e:  # a key or shape the model has and the checkpoint lacks
        raise InputError(f"{ckpt_dir}: cannot load this torch_dist checkpoint ({type(e).__name__}: {e})") from None


def check_reshardable(meta: Dict[str, Any], arch: ModelArch, tp: int, where: str) -> None:
    """InputError when the checkpoint's padded attention shapes differ from the model's at this TP."""
    saved = meta.get("megatron_query_groups")
    if saved is not None and int(saved) != arch.megatron_groups(tp):
        raise InputError(
            f"{where}: written at TP={meta.get('tp')} with {saved} query groups ({meta.get('padded_kv_groups')} "
            f"zero padding groups), but the model at TP={tp} has {arch.megatron_groups(tp)}: torch_dist cannot "
            f"reshard padded attention groups. Resume at a TP that divides the {arch.num_kv_heads} KV heads the "
            f"same way, or export it (`egrsd convert megatron-to-hf`) and start from the Hugging Face folder"
        )


def write_model_metadata(
    out_dir: str, arch: ModelArch, tp: int, pp: int, dtype: torch.dtype, extra: Optional[Dict[str, Any]], tokenizer
) -> None:
    """egrsd_checkpoint.json (this FORMAT) and tokenizer/ (a tokenizer object or a folder to copy from)."""
    meta = build_metadata(arch, tp, pp, dtype, extra)
    meta["format"] = FORMAT
    args = meta["megatron_lm_args"]
    args[args.index("--ckpt-format") + 1] = "torch_dist"
    tok = None
    if isinstance(tokenizer, str):
        tok = TOKENIZER_DIR if copy_tokenizer_files(tokenizer, os.path.join(out_dir, TOKENIZER_DIR)) else None
    elif tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(out_dir, TOKENIZER_DIR))
        tok = TOKENIZER_DIR
    atomic_write_json(os.path.join(out_dir, META_FILE), dict(meta, tokenizer=tok))


def read_dist_metadata(ckpt_dir: str) -> Dict[str, Any]:
    return read_format_metadata(ckpt_dir, FORMAT)


def save_model_checkpoint(
    model: torch.nn.Module,
    arch: ModelArch,
    out_dir: str,
    extra_meta: Optional[Dict[str, Any]] = None,
    tokenizer_src: Optional[str] = None,
) -> str:
    """Collective: the model alone in torch_dist (training checkpoints add the optimizer: train_state.py)."""
    from megatron.core import parallel_state as ps  # lazy: see _megatron

    dist_checkpointing, _, _ = _megatron()
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    rank = dist.get_rank()
    if rank == 0:
        if os.path.exists(out_dir) and os.listdir(out_dir):
            raise InputError(f"{out_dir} already exists and is not empty: choose another folder")
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if rank == 0:
        dtype = next(model.parameters()).dtype
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        write_model_metadata(out_dir, arch, tp, pp, dtype, extra_meta, tokenizer_src)
    dist.barrier()
    return out_dir


def load_model_checkpoint(model: torch.nn.Module, arch: ModelArch, ckpt_dir: str) -> None:
    """Collective: this rank's shards of a torch_dist checkpoint at the CURRENT TP/PP (any it was written at)."""
    from megatron.core import parallel_state as ps  # lazy: see _megatron

    meta = read_dist_metadata(ckpt_dir)
    checkpoint_arch(ckpt_dir, meta, arch)
    check_reshardable(meta, arch, ps.get_tensor_model_parallel_world_size(), ckpt_dir)
    loaded = safe_dist_load(model_template(model), ckpt_dir)
    model.load_state_dict(fill_extra_state(model, loaded), strict=True)


# ---- offline reading (one process, no process group) ----------------------------------------------------
class _RegionPlanner(DefaultLoadPlanner):
    """Reads one region of each named global tensor into a given tensor (what a rank's shard load does,
    without a process group or torch ShardedTensors): the stored chunks that overlap the region."""

    def __init__(self, regions: Dict[str, Tuple[Tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for fqn, (offsets, dest) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def load_bytes(self, read_item, value) -> None:  # never requested (module docstring)
        raise InputError(f"refusing to unpickle byte entry {read_item.dest_index.fqn}")


# The local spec stores its norms under the Transformer Engine spec's keys (Megatron's
# sharded_state_dict_keys_map for get_gpt_layer_local_spec), so either spec loads the other's checkpoints.
_SHARDED_KEY_MAP = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)


def _sharded_key(pm: ParamMap) -> Tuple[str, Optional[int]]:
    """(global key, layer index on the stacked leading axis) of a parameter in GPTModel's sharded state dict."""
    if pm.layer is None:
        return pm.mname, None
    rest = pm.mname[len(f"decoder.layers.{pm.layer}.") :]
    for local, te in _SHARDED_KEY_MAP:
        if rest.startswith(local):
            rest = te + rest[len(local) :]
    return "decoder.layers." + rest, pm.layer


class DistSource:
    """Full Hugging Face tensors from a torch_dist checkpoint, one Megatron parameter at a time, in one
    process: each fetch reads only that layer's region of the stacked global tensor (its stored chunks).

    The global tensor of a parameter is the concatenation of the TP shards along the split dimension
    (Megatron's sharding), so cutting it back into the written TP's pieces gives exactly what
    MegatronSource reads from the per-rank files, and `layout.hf_from_shards` does the rest (dropping
    padding). linear_fc1 is the exception: its factory stores [gate of all ranks; up of all ranks], which
    is already Hugging Face's gate and up.
    """

    _TP_DIM = {"vocab": 0, "qkv": 0, "row": 1, "proj": 1}

    def __init__(self, ckpt_dir: str, arch: Optional[ModelArch] = None) -> None:
        self.dir = os.path.abspath(ckpt_dir)
        self.meta = read_dist_metadata(self.dir)
        self.arch = checkpoint_arch(self.dir, self.meta, arch)
        self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        self.tensors = stored_tensors(self.dir)
        self._reader = _SafeReader(self.dir)
        self._by_names = {pm.hf_names: pm for pm in emitters(self.arch)}

    def global_tensor(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The stored global tensor `key` (with `layer`: its slice on the stacked leading axis)."""
        if key not in self.tensors:
            raise InputError(f"{self.dir}: tensor {key} is missing from the torch_dist checkpoint")
        md = self.tensors[key]
        shape = tuple(md.size)
        offsets = (0,) * len(shape)
        if layer is not None:
            shape, offsets = (1,) + shape[1:], (layer,) + offsets[1:]
        dest = torch.empty(shape, dtype=md.properties.dtype)
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            planner = _RegionPlanner({key: (offsets, dest)})
            dcp_load({key: dest}, storage_reader=self._reader, planner=planner, no_dist=True)
        return dest[0] if layer is not None else dest

    def fetch(self, hf_names: Sequence[str]) -> List[torch.Tensor]:
        pm = self._by_names.get(tuple(hf_names))
        if pm is None:
            raise ValueError(f"{self.dir}: no Megatron parameter defines {list(hf_names)}")
        full = self.global_tensor(*_sharded_key(pm))
        if pm.kind == "fc1":
            return [t.contiguous() for t in full.chunk(2, dim=0)]
        if pm.kind in self._TP_DIM:
            return hf_from_shards(pm, list(full.chunk(self.tp, dim=self._TP_DIM[pm.kind])), self.arch)
        return hf_from_shards(pm, [full], self.arch)

    def close(self) -> None:
        pass
