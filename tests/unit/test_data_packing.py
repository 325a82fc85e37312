"""data/packing.py: the packed row, its cu_seqlens/positions, and the response positions it scores."""

from __future__ import annotations

import pytest
import torch

from egrsd_megatron.data.packing import gather_response_logits, pack_sequences


def test_layout():
    seqs = [[10, 11, 12, 13], [20, 21], [30, 31, 32]]
    pk = pack_sequences(seqs, [2, 1, 1], pad_to=12, pad_id=9)
    assert pk.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 30, 31, 32, 9, 9, 9]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]]
    assert pk.cu_seqlens.tolist() == [0, 4, 6, 9, 12] and pk.cu_seqlens.dtype == torch.int32
    assert pk.max_seqlen == 4 and pk.num_sequences == 3 and pk.num_padding == 3
    assert pk.resp_pos.tolist() == [[1, 2], [4, 0], [6, 7]]
    assert pk.targets.tolist() == [[12, 13], [21, 0], [31, 32]]
    assert pk.mask.tolist() == [[True, True], [True, False], [True, True]]
    assert pk.flat_resp_pos.tolist() == [1, 2, 4, 6, 7]
    assert pk.flat_segment_ids.tolist() == [0, 0, 1, 2, 2]


def test_response_positions_score_the_targets():
    """Logits at resp_pos predict the NEXT token: the pack token at resp_pos + 1 is the target."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (7, 3, 11, 5)]
    starts = [2, 1, 6, 5]
    pk = pack_sequences(seqs, starts)
    nxt = pk.input_ids[0][pk.resp_pos + 1]
    assert torch.equal(nxt[pk.mask], pk.targets[pk.mask])
    # the next token is always in the same segment
    seg_of = torch.repeat_interleave(torch.arange(4), torch.tensor([7, 3, 11, 5]))
    assert torch.equal(seg_of[pk.flat_resp_pos + 1], pk.flat_segment_ids)
    assert pk.cu_seqlens[-1] == pk.input_ids.shape[1] == 26 and pk.max_seqlen == 11
    logits = torch.randn(1, 26, 6)
    got = gather_response_logits(logits, pk)
    assert got.shape == (4, pk.mask.shape[1], 6)
    assert torch.equal(got[2, 3], logits[0, 7 + 3 + 6 - 1 + 3])


def test_bad_input():
    with pytest.raises(ValueError, match="sequence 1 has 2 tokens and response start 0"):
        pack_sequences([[1, 2], [3, 4]], [1, 0])
    with pytest.raises(ValueError, match="sequence 0 has 2 tokens and response start 3"):
        pack_sequences([[1, 2]], [3])
    with pytest.raises(ValueError, match="5 tokens do not fit pad_to=4"):
        pack_sequences([[1, 2], [3, 4, 5]], [1, 1], pad_to=4)
    with pytest.raises(ValueError, match="no sequences"):
        pack_sequences([], [])
    with pytest.raises(ValueError, match=r"\[1, T, V\]"):
        gather_response_logits(torch.zeros(2, 3, 4), pack_sequences([[1, 2]], [1]))


def test_pad_to_exact_fit_adds_no_segment():
    pk = pack_sequences([[1, 2], [3, 4, 5]], [1, 1], pad_to=5)
    assert pk.cu_seqlens.tolist() == [0, 2, 5] and pk.num_padding == 0


def test_packs_for_bins_rows_follow_bins():
    from egrsd_megatron.data.balance import pack_bins
    from egrsd_megatron.data.packing import packs_for_bins

    seqs = [[i] * n for i, n in enumerate([4, 9, 2, 6, 3], start=1)]
    starts = [1, 3, 1, 2, 1]
    bins = pack_bins([len(s) for s in seqs], 10)
    packs = packs_for_bins(seqs, starts, bins, pad_to=10)
    assert [p.input_ids.shape for p in packs] == [torch.Size([1, 10])] * len(bins)
    for b, p in zip(bins, packs):
        assert p.lengths == [len(seqs[i]) for i in b]
        for r, i in enumerate(b):
            n = len(seqs[i]) - starts[i]
            assert p.targets[r, :n].tolist() == seqs[i][starts[i] :]
