"""`egrsd_checkpoint.json`: the metadata file every on-disk model checkpoint of this project carries.

Its `format` field names the on-disk format; `formats.py` dispatches load/save on it. Each format adds
its own keys (megatron_format: tp, pp, arch, dtype, padded vocabulary, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from ..models.arch import ModelArch
from ..utils.errors import InputError, MissingInputError

META_FILE = "egrsd_checkpoint.json"


def read_metadata(ckpt_dir: str) -> Dict[str, Any]:
    """The metadata of a checkpoint folder (at least its `format`); errors name the file and what is wrong."""
    p = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(p):
        raise MissingInputError(
            f"{ckpt_dir}: no {META_FILE}; not a checkpoint written by egrsd (convert it with "
            f"`egrsd convert hf-to-megatron`)"
        )
    with open(p) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "format" not in meta:
        raise InputError(f"{p}: key 'format' is missing")
    return meta


def read_format_metadata(ckpt_dir: str, fmt: str) -> Dict[str, Any]:
    """The metadata of a checkpoint folder written in format `fmt`, with the keys every format has."""
    meta = read_metadata(ckpt_dir)
    p = os.path.join(ckpt_dir, META_FILE)
    for k in ("format", "tp", "pp", "arch", "dtype"):
        if k not in meta:
            raise InputError(f"{p}: key {k!r} is missing")
    if meta["format"] != fmt:
        raise InputError(f"{p}: format {meta['format']!r} is not {fmt!r}")
    return meta


def checkpoint_arch(ckpt_dir: str, meta: Dict[str, Any], arch: Optional[ModelArch] = None) -> ModelArch:
    """The checkpoint's architecture; InputError naming the differences when `arch` is given and differs."""
    try:
        saved = ModelArch.from_dict(meta["arch"])
    except TypeError as e:
        raise InputError(f"{os.path.join(ckpt_dir, META_FILE)}: 'arch' is not a model architecture ({e})") from e
    if arch is not None and arch != saved:
        diff = {k: (v, getattr(arch, k)) for k, v in saved.to_dict().items() if getattr(arch, k) != v}
        raise InputError(
            f"{ckpt_dir}: checkpoint architecture differs from the model's in {diff} (checkpoint value, model value)"
        )
    return saved
