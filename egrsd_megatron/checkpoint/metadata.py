"""`egrsd_checkpoint.json`: the metadata file every on-disk model checkpoint of this project carries.

Its `format` field names the on-disk format; `formats.py` dispatches load/save on it. Each format adds
its own keys (megatron_format: tp, pp, arch, dtype, padded vocabulary, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

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
