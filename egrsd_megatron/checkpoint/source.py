"""The declared source interface: anything that yields full, unpadded, Hugging Face-named tensors.

`reshard.load_from_source` cuts this rank's Megatron shard from any TensorSource, so a new on-disk
format (or a live model, or a test double) only has to implement `fetch`. Implementations:
`hf_io.HFSource` (a safetensors folder) and `megatron_format.MegatronSource` (per-rank files, any TP/PP).
"""

from __future__ import annotations

from typing import List, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class TensorSource(Protocol):
    def fetch(self, hf_names: Sequence[str]) -> List[torch.Tensor]:
        """The full tensors named `hf_names` (Hugging Face names, in that order; e.g. q, k, v of one layer)."""
        ...
