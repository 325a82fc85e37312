"""models: PackedSeqParams of a pack and the packed attention's checks of it (no process group needed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from egrsd_megatron.data.packing import pack_sequences
from egrsd_megatron.models import packed_seq_params


def test_packed_seq_params_of_a_pack():
    pk = pack_sequences([[1, 2, 3], [4, 5]], [1, 1], pad_to=8)
    p = packed_seq_params(pk.cu_seqlens, pk.max_seqlen)
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == p.cu_seqlens_kv.tolist() == [0, 3, 5, 8]
    assert p.max_seqlen_q == p.max_seqlen_kv == 3
    # A larger max_seqlen (e.g. the whole pack) would make Megatron's THD RoPE continue positions.
    with pytest.raises(ValueError, match="max_seqlen 8 != longest segment 3"):
        packed_seq_params(pk.cu_seqlens, 8)


def test_segment_bounds_refuses_what_it_cannot_honour():
    from egrsd_megatron.models.packed_attention import segment_bounds

    p = packed_seq_params(torch.tensor([0, 3, 5]), 3)
    assert segment_bounds(p, 5) == [0, 3, 5]
    with pytest.raises(ValueError, match="pack length 6"):
        segment_bounds(p, 6)
    with pytest.raises(ValueError, match="only 'thd'"):
        segment_bounds(dataclasses.replace(p, qkv_format="sbhd"), 5)
    with pytest.raises(ValueError, match="padded"):
        segment_bounds(dataclasses.replace(p, cu_seqlens_q_padded=p.cu_seqlens_q), 5)
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_kv"):
        segment_bounds(dataclasses.replace(p, cu_seqlens_kv=torch.tensor([0, 2, 5], dtype=torch.int32)), 5)
