"""Megatron checkpoints on disk: Megatron-LM's per-rank ("torch", legacy) layout, resharded on load.

Layout written (what Megatron-LM's `load_checkpoint` reads with `--ckpt-format torch`, no conversion):
    <dir>/latest_checkpointed_iteration.txt          "release"
    <dir>/release/mp_rank_TT[_PPP]/model_optim_rng.pt {"model": state_dict, "checkpoint_version": 3.0,
                                                        "iteration": 0}   (_PPP only when PP > 1)
    <dir>/egrsd_checkpoint.json                      our metadata: arch, TP/PP written, dtype, padded vocab,
                                                        padded attention groups/heads (zero KV groups added
                                                        when TP does not divide them), source, tokenizer
                                                        folder, Megatron-LM arguments (padded counts)
    <dir>/tokenizer/                                 tokenizer files copied from the source (if any)
State-dict keys are GPTModel's local-spec names (per-stage layer numbering, `_extra_state` entries None),
checked in the tests by `GPTModel.load_state_dict(..., strict=True)`, which is the call Megatron-LM makes.

Why the converter writes this format and not Megatron-Core dist_checkpointing (torch_dist, dist_format.py,
which training checkpoints use with train.ckpt_format=torch_dist): writing a torch_dist checkpoint needs
the model's sharded_state_dict and a process group of TP x PP ranks, so a converter would have to build
the model on N spawned ranks; the per-rank layout can be written from the mapping alone, in one process,
rank file by rank file, with at most one rank's shard in memory. Resharding on load (any TP/PP)
is done here: each target parameter is rebuilt from the source TP shards (files memory-mapped, one
parameter at a time) through the Hugging Face layout, then cut for the target rank.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..models.arch import ModelArch
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import InputError, MissingInputError, OutputExistsError
from .layout import (
    ParamMap,
    canonical_local_name,
    emitters,
    hf_from_shards,
    layers_per_stage,
    stage_extra_state_keys,
    stage_of,
    stage_params,
)
from .metadata import META_FILE, checkpoint_arch, read_format_metadata
from .reshard import load_from_source, model_params_by_canonical_name
from .safe_load import load_pt

FORMAT = "megatron-lm-torch-per-rank"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def mp_rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's per-rank naming: mp_rank_TT, or mp_rank_TT_PPP with pipeline parallelism."""
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def rank_file(ckpt_dir: str, tp_rank: int, pp_rank: int, pp: int) -> str:
    return os.path.join(ckpt_dir, "release", mp_rank_dir(tp_rank, pp_rank, pp), "model_optim_rng.pt")


def megatron_lm_args(arch: ModelArch, tp: int, pp: int) -> List[str]:
    """The Megatron-LM pretrain_gpt.py arguments describing this model (recorded in the metadata)."""
    a = [
        "--num-layers",
        str(arch.num_layers),
        "--hidden-size",
        str(arch.hidden_size),
        # Padded counts (zero KV groups appended when TP does not divide them; ModelArch.megatron_groups).
        "--num-attention-heads",
        str(arch.megatron_heads(tp)),
        "--group-query-attention",
        "--num-query-groups",
        str(arch.megatron_groups(tp)),
        "--kv-channels",
        str(arch.head_dim),
        "--ffn-hidden-size",
        str(arch.ffn_hidden_size),
        "--normalization",
        "RMSNorm",
        "--norm-epsilon",
        str(arch.rms_norm_eps),
        "--swiglu",
        "--disable-bias-linear",
        "--position-embedding-type",
        "rope",
        "--rotary-base",
        str(int(arch.rope_theta)),
        "--max-position-embeddings",
        str(arch.max_position_embeddings),
        "--make-vocab-size-divisible-by",
        "128",
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        "--ckpt-format",
        "torch",
        "--use-checkpoint-args",
    ]
    if arch.qk_norm:
        a.append("--qk-layernorm")
    if not arch.tie_word_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    return a


def build_metadata(
    arch: ModelArch, tp: int, pp: int, dtype: torch.dtype, extra: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    meta = {
        "format": FORMAT,
        "tp": tp,
        "pp": pp,
        "arch": arch.to_dict(),
        "dtype": str(dtype).replace("torch.", ""),
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": arch.padded_vocab_size(tp),
        # Attention as stored: groups num_kv_heads.. are zero padding (dropped when converting to HF).
        "megatron_query_groups": arch.megatron_groups(tp),
        "megatron_attention_heads": arch.megatron_heads(tp),
        "padded_kv_groups": arch.padded_groups(tp),
        "megatron_lm_args": megatron_lm_args(arch, tp, pp),
    }
    meta.update(extra or {})
    return meta


def read_checkpoint_metadata(ckpt_dir: str) -> Dict[str, Any]:
    """This format's metadata of a checkpoint folder; errors name the file and what is wrong."""
    return read_format_metadata(ckpt_dir, FORMAT)


def rank_state_dict(arch: ModelArch, pp: int, pp_rank: int, tensor_of) -> Dict[str, Any]:
    """The state dict of one rank file: `tensor_of(local_name, ParamMap)` for every parameter, in model order."""
    sd: Dict[str, Any] = {}
    for local, pm in stage_params(arch, pp, pp_rank):
        sd[local] = tensor_of(local, pm)
    for k in stage_extra_state_keys(arch, pp, pp_rank):
        sd[k] = None
    return sd


def write_rank_file(path: str, sd: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": sd, "checkpoint_version": 3.0, "iteration": 0}, path)


def write_common(out_dir: str, meta: Dict[str, Any], tokenizer_src: Optional[str]) -> None:
    atomic_write_text(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "release")
    copied = copy_tokenizer_files(tokenizer_src, os.path.join(out_dir, TOKENIZER_DIR)) if tokenizer_src else []
    meta = dict(meta, tokenizer=TOKENIZER_DIR if copied else None, tokenizer_source=tokenizer_src)
    atomic_write_json(os.path.join(out_dir, META_FILE), meta)


def copy_tokenizer_files(src: str, dst: str) -> List[str]:
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if copied:
        os.makedirs(dst, exist_ok=True)
        for f in copied:
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return copied


class MegatronSource:
    """Full Hugging Face tensors rebuilt from a per-rank checkpoint, one Megatron parameter at a time.

    Rank files are memory-mapped; a mapped file stays open only until `map_budget_bytes` of its tensors
    have been read, then every map is dropped (pages released) and reopened on the next read. Resident
    memory is thus bounded by the budget plus the parameter being rebuilt, at any model size, while a
    file's pickle is parsed once per budget rather than once per tensor (0.1-0.2 s per parse).
    """

    map_budget_bytes = 256 * 1024**2

    def __init__(self, ckpt_dir: str, arch: Optional[ModelArch] = None) -> None:
        self.dir = os.path.abspath(ckpt_dir)
        self.meta = read_checkpoint_metadata(self.dir)
        self.arch = checkpoint_arch(self.dir, self.meta, arch)
        self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        for pr in range(self.pp):
            for tr in range(self.tp):
                f = rank_file(self.dir, tr, pr, self.pp)
                if not os.path.isfile(f):
                    raise MissingInputError(
                        f"{self.dir}: rank file {os.path.relpath(f, self.dir)} is missing "
                        f"(metadata says TP={self.tp}, PP={self.pp})"
                    )
        self._by_names = {pm.hf_names: pm for pm in emitters(self.arch)}
        self._maps: Dict[tuple, Dict[str, Any]] = {}
        self._read_bytes = 0

    def load_rank(self, tp_rank: int, pp_rank: int) -> Dict[str, Any]:
        f = rank_file(self.dir, tp_rank, pp_rank, self.pp)
        obj = load_pt(f, "a Megatron rank file", mmap=True)
        if not isinstance(obj, dict) or "model" not in obj:
            raise InputError(f"{f}: no 'model' state dict inside")
        return obj["model"]

    def shards(self, pm: ParamMap) -> List[torch.Tensor]:
        stage = stage_of(pm, self.arch, self.pp)
        local = pm.local_name(stage * layers_per_stage(self.arch, self.pp))
        if self._read_bytes > self.map_budget_bytes:
            self._maps.clear()  # unmaps: touched file pages leave this process's RSS
            self._read_bytes = 0
        out = []
        for tr in range(self.tp):
            if (tr, stage) not in self._maps:
                self._maps[(tr, stage)] = self.load_rank(tr, stage)
            sd = self._maps[(tr, stage)]
            if local not in sd or sd[local] is None:
                raise InputError(f"{rank_file(self.dir, tr, stage, self.pp)}: tensor {local} is missing")
            out.append(sd[local].clone())  # a private copy: the map may be released any time
            self._read_bytes += out[-1].numel() * out[-1].element_size()
        return out

    def close(self) -> None:
        self._maps.clear()

    def fetch(self, hf_names: Sequence[str]) -> List[torch.Tensor]:
        pm = self._by_names.get(tuple(hf_names))
        if pm is None:
            raise ValueError(f"{self.dir}: no Megatron parameter defines {list(hf_names)}")
        return hf_from_shards(pm, self.shards(pm), self.arch)


def save_model_checkpoint(
    model: torch.nn.Module,
    arch: ModelArch,
    out_dir: str,
    extra_meta: Optional[Dict[str, Any]] = None,
    tokenizer_src: Optional[str] = None,
) -> str:
    """Write this model-parallel group's weights to `out_dir` (collective over all ranks; DP rank 0 writes).

    Written into `<out_dir>.tmp-<rank0 pid>` and renamed when every rank succeeded; on any failure the
    temp folder is removed and nothing is left at `out_dir`.
    """
    from megatron.core import parallel_state as ps  # seconds to import; the offline converter never needs it

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tpr, ppr, dpr = (
        ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    box = [f"{out_dir}.tmp-{os.getpid()}"] if rank == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    tmp = box[0]
    ok = torch.ones(1)
    err: Optional[BaseException] = None
    try:
        if rank == 0:
            if os.path.exists(out_dir) and os.listdir(out_dir):
                raise OutputExistsError(f"{out_dir} already exists and is not empty: choose another folder")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if dist.is_initialized():
            dist.barrier()
        if dpr == 0:
            params = model_params_by_canonical_name(model)
            dtype = next(iter(params.values())).dtype
            sd = rank_state_dict(arch, pp, ppr, lambda local, pm: params[local].detach().cpu().clone())
            write_rank_file(rank_file(tmp, tpr, ppr, pp), sd)
            if rank == 0:
                write_common(tmp, build_metadata(arch, tp, pp, dtype, extra_meta), tokenizer_src)
    except BaseException as e:  # noqa: BLE001 - all ranks must agree before the rename
        ok.zero_()
        err = e
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        if ok.item() == 1:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.replace(tmp, out_dir)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    if err is not None:
        raise err
    if ok.item() != 1:
        raise RuntimeError(f"saving {out_dir} failed on another rank; nothing was written")
    return out_dir


def load_model_checkpoint(model: torch.nn.Module, arch: ModelArch, ckpt_dir: str) -> None:
    """Load a checkpoint into this rank's model chunk at the CURRENT TP/PP (any TP/PP it was written with).

    Same TP/PP: this rank's file goes straight into `model.load_state_dict(strict=True)` (what Megatron-LM
    does). Other TP/PP: every parameter is rebuilt from the source shards and re-cut (see module docstring).
    """
    from megatron.core import parallel_state as ps  # seconds to import; the offline converter never needs it

    src = MegatronSource(ckpt_dir, arch)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tpr, ppr = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    names = {n for n, _ in model.named_parameters()}
    local_spec = all(n == canonical_local_name(n) for n in names)
    if (tp, pp) == (src.tp, src.pp) and local_spec:
        sd = src.load_rank(tpr, ppr)
        try:
            model.load_state_dict(sd, strict=True)
        finally:
            del sd
        return
    try:
        load_from_source(model, arch, src, tp, tpr, pp, ppr)
    finally:
        src.close()


__all__ = [
    "save_model_checkpoint",
    "load_model_checkpoint",
    "read_checkpoint_metadata",
    "MegatronSource",
    "rank_file",
    "rank_state_dict",
    "write_rank_file",
    "write_common",
    "build_metadata",
]
