"""On-disk model checkpoint formats, dispatched on the `format` field of egrsd_checkpoint.json.

Adding a format = one module with a save function, a load function and a TensorSource, and one entry in
FORMATS below. Loading reads the folder's metadata and calls that format's loader; the trainer, the
resume code, the converter and `egrsd eval` all come through here.

    load_checkpoint(model, arch, dir)   this rank's shard at the CURRENT TP/PP (reshards when needed)
    save_checkpoint(model, arch, dir)   collective; written in DEFAULT_FORMAT unless `fmt` names another
    open_source(dir)                    a TensorSource of full HF-named tensors (megatron-to-hf, eval)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch

from ..models.arch import ModelArch
from ..utils.errors import InputError
from . import dist_format, megatron_format
from .metadata import META_FILE, read_metadata

__all__ = ["DEFAULT_FORMAT", "FORMATS", "CheckpointFormat", "load_checkpoint", "open_source", "save_checkpoint"]


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    save: Callable[..., str]  # (model, arch, out_dir, extra_meta=None, tokenizer_src=None) -> out_dir
    load: Callable[..., None]  # (model, arch, ckpt_dir) -> None
    source: Callable[..., Any]  # (ckpt_dir, arch=None) -> TensorSource with .arch, .meta, .dir, .close()


FORMATS: Dict[str, CheckpointFormat] = {
    megatron_format.FORMAT: CheckpointFormat(
        megatron_format.FORMAT,
        megatron_format.save_model_checkpoint,
        megatron_format.load_model_checkpoint,
        megatron_format.MegatronSource,
    ),
    # Megatron-Core dist_checkpointing (torch_dist): training checkpoints with train.ckpt_format=torch_dist.
    dist_format.FORMAT: CheckpointFormat(
        dist_format.FORMAT,
        dist_format.save_model_checkpoint,
        dist_format.load_model_checkpoint,
        dist_format.DistSource,
    ),
}
DEFAULT_FORMAT = megatron_format.FORMAT


def format_of(ckpt_dir: str) -> CheckpointFormat:
    """The registered format named by the folder's metadata; InputError naming the known ones otherwise."""
    name = read_metadata(ckpt_dir)["format"]
    if name not in FORMATS:
        raise InputError(
            f"{ckpt_dir}/{META_FILE}: format {name!r} is not a known checkpoint format "
            f"(known: {', '.join(sorted(FORMATS))})"
        )
    return FORMATS[name]


def load_checkpoint(model: torch.nn.Module, arch: ModelArch, ckpt_dir: str) -> None:
    format_of(ckpt_dir).load(model, arch, ckpt_dir)


def save_checkpoint(
    model: torch.nn.Module,
    arch: ModelArch,
    out_dir: str,
    extra_meta: Optional[Dict[str, Any]] = None,
    tokenizer_src: Optional[str] = None,
    fmt: str = DEFAULT_FORMAT,
) -> str:
    if fmt not in FORMATS:
        raise InputError(f"checkpoint format {fmt!r} is not known (known: {', '.join(sorted(FORMATS))})")
    return FORMATS[fmt].save(model, arch, out_dir, extra_meta=extra_meta, tokenizer_src=tokenizer_src)


def open_source(ckpt_dir: str, arch: Optional[ModelArch] = None) -> Any:
    return format_of(ckpt_dir).source(ckpt_dir, arch)
