"""Compatibility names: the HF <-> Megatron code was split into `hf_io.py` (Hugging Face folders on disk),
`reshard.py` (full HF-named tensors <-> this rank's Megatron shard) and `source.py` (the TensorSource
interface). Import from those; this module keeps the old import paths of callers working."""

from __future__ import annotations

from .hf_io import HFSource
from .layout import hf_from_shards, shard_from_hf
from .reshard import gather_hf_state_dict, load_from_source, load_hf_weights, model_params_by_canonical_name

__all__ = [
    "HFSource",
    "load_hf_weights",
    "load_from_source",
    "gather_hf_state_dict",
    "shard_from_hf",
    "hf_from_shards",
    "model_params_by_canonical_name",
]
