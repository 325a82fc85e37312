"""Turn scored rollouts into micro-batches for the teacher and student passes: padded, or packed.

Sample i: student sequence s_i = student_prompt_i + response_i, teacher sequence t_i = teacher_prompt_i
+ response_i (the SAME response ids). Logits at position p predict token p + 1, so response token j
is scored by student logits at len(student_prompt_i) - 1 + j and teacher logits at
len(teacher_prompt_i) - 1 + j. Sequences are right-padded (a causal model never lets a pad influence an
earlier position), and the response positions are gathered into aligned [B, R_max, V_local] logits.

Packed (`parallel.max_tokens_per_micro_batch`, docs/packing.md): data/balance.py assigns the step's
sequences to data-parallel ranks and to micro-batches of at most that many tokens, and each micro-batch is
ONE row [1, T] per pass (data/packing.py: `Pack`, Megatron's THD layout with cu_seqlens), built from the
SAME bins for student and teacher so the rows of `targets`, `mask`, `advantages` align. The response
positions then point into the pack and the gathered logits have the same [n, R, V_local] layout as padded,
so everything after the gather (token_stats, advantages, losses) is shared by both paths. Each pack keeps
its own length at every pipeline-parallel size (PP > 1: Megatron's variable_seq_lengths, trainer/passes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..data.balance import plan_micro_batches
from ..data.packing import Pack, pack_sequences


@dataclass
class Sample:
    student_prompt: List[int]
    teacher_prompt: List[int]
    response: List[int]
    advantage: float
    reward: float
    truncated: bool
    group: int  # prompt index within the step (for logging)
    engine_logprobs: List[float] = field(default_factory=list)  # the rollout engine's, one per response token


@dataclass
class MicroBatch:
    index: int
    student_ids: torch.Tensor  # [b, Ls] long
    teacher_ids: torch.Tensor  # [b, Lt] long
    student_resp_pos: torch.Tensor  # [b, R] long: positions of the logits that score each response token
    teacher_resp_pos: torch.Tensor  # [b, R] long
    targets: torch.Tensor  # [b, R] long: response token ids (0 where masked)
    mask: torch.Tensor  # [b, R] bool: valid response tokens
    advantages: torch.Tensor  # [b] float32
    engine_logprobs: Optional[torch.Tensor] = None  # [b, R] float32 (0 where masked); None: the engine gave none
    # Packed (b = 1 row of ids; the b of the other fields is the number n of sequences in the pack):
    student_pack: Optional[Pack] = None  # position_ids, cu_seqlens, max_seqlen of student_ids
    teacher_pack: Optional[Pack] = None  # of teacher_ids (None also when no teacher pass was planned)
    # Row i holds sample sample_ids[i] of the list the micro-batches were made from (this rank's samples when
    # padded, the step's DP-gathered samples when packed): how per-token outputs find their sample.
    sample_ids: List[int] = field(default_factory=list)
    # Real (unpadded) tokens of each row's sequence, per side ("student" / "teacher"): what `pass_token_metrics`
    # compares with the computed positions.
    seq_lengths: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def packed(self) -> bool:
        return self.student_pack is not None

    @property
    def segment_ids(self) -> Optional[torch.Tensor]:
        """[n, R]: the sequence each response slot belongs to (packed), for the lookahead's boundary; None
        when padded (each row is one sequence there, which is the lookahead's default)."""
        return self.student_pack.segment_ids if self.student_pack is not None else None

    def computed_tokens(self, side: str) -> int:
        """Token positions the `side` ("student" | "teacher") pass computes, padding included."""
        return int(getattr(self, f"{side}_ids").numel())

    def real_tokens(self, side: str) -> int:
        """Tokens of the `side` sequences themselves (no padding)."""
        return sum(self.seq_lengths[side])


def pass_token_metrics(mb: MicroBatch, teacher: bool) -> Dict[str, float]:
    """The micro-batch's `computed_tokens_<side>` (positions its pass computes, padding included) and
    `padding_frac_<side>` = 1 - real / computed, for the student pass and, when one ran, the teacher pass.
    Reduced over micro-batches and DP ranks (trainer/metrics.py) the fraction is weighted by the computed
    tokens: sum_r (1 - real_r / c_r) c_r / sum_r c_r = 1 - sum real / sum computed, the step's own fraction.
    (The reference pass, loss.kl_coef > 0, runs the student sequences: the student's numbers.)"""
    out: Dict[str, float] = {}
    for side in ("student", "teacher") if teacher else ("student",):
        computed = mb.computed_tokens(side)
        out[f"computed_tokens_{side}"] = float(computed)
        out[f"padding_frac_{side}"] = 1.0 - mb.real_tokens(side) / computed if computed else 0.0
    return out


def _pad(rows: Sequence[Sequence[int]], length: int, value: int = 0) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def make_micro_batches(samples: List[Sample], micro_batch_size: int, pad_id: int = 0) -> List[MicroBatch]:
    """Split `samples` (in order) into micro-batches padded to the LONGEST sequence of the whole batch.

    One length for every micro-batch: Megatron's pipeline schedule sends fixed-shape activations.
    """
    if len(samples) % micro_batch_size:
        raise ValueError(f"{len(samples)} samples do not split into micro-batches of {micro_batch_size}")
    ls = max(len(s.student_prompt) + len(s.response) for s in samples)
    lt = max(len(s.teacher_prompt) + len(s.response) for s in samples)
    r = max(len(s.response) for s in samples)
    out = []
    for k in range(0, len(samples), micro_batch_size):
        chunk = samples[k : k + micro_batch_size]
        sp = torch.zeros((len(chunk), r), dtype=torch.long)
        tp = torch.zeros((len(chunk), r), dtype=torch.long)
        mask = torch.zeros((len(chunk), r), dtype=torch.bool)
        for i, s in enumerate(chunk):
            n = len(s.response)
            sp[i, :n] = torch.arange(len(s.student_prompt) - 1, len(s.student_prompt) - 1 + n)
            tp[i, :n] = torch.arange(len(s.teacher_prompt) - 1, len(s.teacher_prompt) - 1 + n)
            mask[i, :n] = True
        out.append(
            MicroBatch(
                index=k // micro_batch_size,
                student_ids=_pad([s.student_prompt + s.response for s in chunk], ls, pad_id),
                teacher_ids=_pad([s.teacher_prompt + s.response for s in chunk], lt, pad_id),
                student_resp_pos=sp,
                teacher_resp_pos=tp,
                targets=_pad([s.response for s in chunk], r, 0),
                mask=mask,
                advantages=torch.tensor([s.advantage for s in chunk], dtype=torch.float32),
                engine_logprobs=_engine_logprobs(chunk, r),
                sample_ids=list(range(k, k + len(chunk))),
                seq_lengths={
                    "student": [len(s.student_prompt) + len(s.response) for s in chunk],
                    "teacher": [len(s.teacher_prompt) + len(s.response) for s in chunk],
                },
            )
        )
    return out


def _engine_logprobs(chunk: Sequence[Sample], r: int) -> Optional[torch.Tensor]:
    """[b, R] float32 of the engine's sampled-token log-probs, or None when any sample lacks them."""
    if any(len(s.engine_logprobs) != len(s.response) for s in chunk):
        return None
    out = torch.zeros((len(chunk), r), dtype=torch.float32)
    for i, s in enumerate(chunk):
        out[i, : len(s.response)] = torch.tensor(s.engine_logprobs, dtype=torch.float32)
    return out


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [b, L, V], positions [b, R] -> [b, R, V] (the logits that score each response token).

    A pack (logits [1, T, V], positions [n, R] into the pack) gives [n, R, V] the same way: one row
    indexed by all n sequences' positions (for b = n = 1 both readings are the same gather)."""
    if logits.shape[0] == 1:
        return logits[0][positions.to(logits.device)]
    idx = positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)


def sequence_lengths(samples: Sequence[Sample], teacher: bool = True) -> List[int]:
    """The balancer's length of each sample: max(student, teacher) tokens, so one plan fits both passes'
    budgets (student only when no teacher pass runs)."""
    return [max(len(s.student_prompt), len(s.teacher_prompt) if teacher else 0) + len(s.response) for s in samples]


def make_packed_micro_batches(
    samples: Sequence[Sample],
    bins: Sequence[Sequence[int]],
    pad_id: int = 0,
    teacher: bool = True,
) -> List[MicroBatch]:
    """One packed MicroBatch per bin (indices into `samples`, data/balance.py); row r is samples[bin[r]].

    Every pack has its own length, its content's (no padding), at any pipeline-parallel size: with PP > 1
    the schedule exchanges each activation's shape before sending it (variable_seq_lengths, passes.py).
    `teacher=False`: no teacher packs (no teacher pass will run; the budget then holds the student
    sequences only)."""

    def sides(b: Sequence[int], side: str):
        rows = [samples[i] for i in b]
        return [getattr(s, f"{side}_prompt") + s.response for s in rows], [
            len(getattr(s, f"{side}_prompt")) for s in rows
        ]

    out = []
    for k, b in enumerate(bins):
        rows = [samples[i] for i in b]
        sp = pack_sequences(*sides(b, "student"), None, pad_id)
        tp = pack_sequences(*sides(b, "teacher"), None, pad_id) if teacher else None
        out.append(
            MicroBatch(
                index=k,
                student_ids=sp.input_ids,
                teacher_ids=tp.input_ids if tp is not None else sp.input_ids[:, :0],
                student_resp_pos=sp.resp_pos,
                teacher_resp_pos=tp.resp_pos if tp is not None else sp.resp_pos[:, :0],
                targets=sp.targets,
                mask=sp.mask,
                advantages=torch.tensor([s.advantage for s in rows], dtype=torch.float32),
                engine_logprobs=_engine_logprobs(rows, sp.mask.shape[1]),
                student_pack=sp,
                teacher_pack=tp,
                sample_ids=list(b),
                seq_lengths={"student": sp.lengths, **({"teacher": tp.lengths} if tp is not None else {})},
            )
        )
    return out


def packed_micro_batches(
    samples: Sequence[Sample],
    max_tokens: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    *,
    pad_id: int = 0,
    teacher: bool = True,
) -> List[MicroBatch]:
    """This data-parallel rank's packed micro-batches of the step's GLOBAL `samples` (the same list, in the
    same order, on every DP rank): data/balance.py's plan (Karmarkar-Karp over the ranks, first-fit
    decreasing under `max_tokens`) is a pure function of the lengths, so every rank computes the same plan
    and keeps its own part. The loss does not depend on the plan: advantages are per sample (computed per
    group before this), and the loss denominator is the global token or sequence count. The same packs at
    every PP size (see make_packed_micro_batches)."""
    plan = plan_micro_batches(sequence_lengths(samples, teacher), dp_size, max_tokens)
    mine = plan[dp_rank]
    if not mine:  # KK leaves a part empty only with fewer sequences than parts
        raise ValueError(f"packed_micro_batches: {len(samples)} sequences leave DP rank {dp_rank} of {dp_size} none")
    return make_packed_micro_batches(samples, mine, pad_id, teacher)
