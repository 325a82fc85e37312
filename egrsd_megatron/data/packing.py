"""Pack variable-length token sequences into one row for Megatron's packed (THD) path.

Sequence i (tokens x_i, length L_i, response starting at token p_i) occupies pack positions
[o_i, o_i + L_i) with o_i = L_0 + ... + L_{i-1}:
  input_ids[0, o_i + t]    = x_i[t]
  position_ids[0, o_i + t] = t                    (positions restart per sequence)
  cu_seqlens               = [o_0, o_1, ..., o_n] (+ one padding segment when padded to a fixed length)
The logits at pack position q predict the token at q + 1 of the same sequence, so response token j of
sequence i (x_i[p_i + j]) is scored by the logits at resp_pos[i, j] = o_i + p_i - 1 + j: the same
[n, R] layout (resp_pos, targets, mask) as the padded trainer's micro-batches, with n = sequences in the
pack. `segment_ids` / `flat_*` give the flat layout (valid response tokens only) for the lookahead.

Padding (`pad_to`, for a caller that needs a fixed length; the trainer pads no pack, at any PP size): pad
tokens form ONE extra segment of cu_seqlens, so they attend only to each other and nothing real reads them;
no response position points into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class Pack:
    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, 0.. per segment
    cu_seqlens: torch.Tensor  # [S + 1] int32, S = num_sequences (+ 1 if padded)
    max_seqlen: int  # longest segment (PackedSeqParams.max_seqlen_q/kv)
    lengths: List[int]  # tokens of each real sequence, pack order
    resp_pos: torch.Tensor  # [n, R] long: pack positions whose logits score each response token (0 if masked)
    targets: torch.Tensor  # [n, R] long: response token ids (0 where masked)
    mask: torch.Tensor  # [n, R] bool: valid response tokens

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_padding(self) -> int:
        return self.input_ids.shape[1] - sum(self.lengths)

    @property
    def segment_ids(self) -> torch.Tensor:
        """[n, R] long: the sequence (row) each response slot belongs to."""
        return torch.arange(self.num_sequences).unsqueeze(1).expand_as(self.mask)

    @property
    def flat_resp_pos(self) -> torch.Tensor:
        """[N] long: resp_pos of the valid response tokens, sequence by sequence (N = mask.sum())."""
        return self.resp_pos[self.mask]

    @property
    def flat_segment_ids(self) -> torch.Tensor:
        return self.segment_ids[self.mask]


def pack_sequences(
    sequences: Sequence[Sequence[int]], response_starts: Sequence[int], pad_to: Optional[int] = None, pad_id: int = 0
) -> Pack:
    """One Pack of `sequences` in the given order; `response_starts[i]` = index of sequence i's first
    response token (its prompt length). `pad_to`: total length T of the pack (a padding segment fills it)."""
    if len(sequences) != len(response_starts):
        raise ValueError(f"pack_sequences: {len(sequences)} sequences but {len(response_starts)} response starts")
    if not sequences:
        raise ValueError("pack_sequences: no sequences to pack")
    lengths = [len(s) for s in sequences]
    for i, (n, p) in enumerate(zip(lengths, response_starts)):
        # p >= 1: the first response token is scored by the logits of the token before it.
        if n == 0 or not 1 <= p <= n:
            raise ValueError(
                f"pack_sequences: sequence {i} has {n} tokens and response start {p}; need a "
                f"non-empty prompt (1 <= start <= length)"
            )
    total = sum(lengths)
    pad = 0 if pad_to is None else pad_to - total
    if pad < 0:
        raise ValueError(f"pack_sequences: {total} tokens do not fit pad_to={pad_to}")
    seg_lens = lengths + ([pad] if pad else [])
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lens, dtype=torch.int64), 0).to(torch.int32)
    ids = torch.full((1, total + pad), pad_id, dtype=torch.long)
    pos = torch.cat([torch.arange(n) for n in seg_lens]).unsqueeze(0)
    r = max(n - p for n, p in zip(lengths, response_starts))
    resp_pos = torch.zeros((len(sequences), r), dtype=torch.long)
    targets = torch.zeros((len(sequences), r), dtype=torch.long)
    mask = torch.zeros((len(sequences), r), dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, response_starts)):
        o, n = int(cu[i]), lengths[i]
        ids[0, o : o + n] = torch.as_tensor(list(seq), dtype=torch.long)
        m = n - p
        resp_pos[i, :m] = torch.arange(o + p - 1, o + n - 1)
        targets[i, :m] = torch.as_tensor(list(seq[p:]), dtype=torch.long)
        mask[i, :m] = True
    return Pack(
        input_ids=ids,
        position_ids=pos,
        cu_seqlens=cu,
        max_seqlen=max(seg_lens),
        lengths=lengths,
        resp_pos=resp_pos,
        targets=targets,
        mask=mask,
    )


def gather_response_logits(logits: torch.Tensor, pack: Pack) -> torch.Tensor:
    """Pack logits [1, T, V] -> [n, R, V] at pack.resp_pos (rows of masked slots are position 0's: mask them)."""
    if logits.dim() != 3 or logits.shape[0] != 1:
        raise ValueError(f"gather_response_logits: logits must be [1, T, V], got {tuple(logits.shape)}")
    return logits[0][pack.resp_pos.to(logits.device)]


def packs_for_bins(
    sequences: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    bins: Sequence[Sequence[int]],
    pad_to: Optional[int] = None,
    pad_id: int = 0,
) -> List[Pack]:
    """One Pack per bin (data/balance.py's index lists), sequences in bin order: row r of pack k is
    sequence bins[k][r]. Build the student and the teacher packs from the SAME bins so their rows align."""
    return [pack_sequences([sequences[i] for i in b], [response_starts[i] for i in b], pad_to, pad_id) for b in bins]
