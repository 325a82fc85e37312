"""Turn scored rollouts into padded micro-batches for the teacher and student passes.

Sample i: student sequence s_i = student_prompt_i + response_i, teacher sequence t_i = teacher_prompt_i
+ response_i (the SAME response ids). Logits at position p predict token p + 1, so response token j
is scored by student logits at len(student_prompt_i) - 1 + j and teacher logits at
len(teacher_prompt_i) - 1 + j. Sequences are right-padded (a causal model never lets a pad influence an
earlier position), and the response positions are gathered into aligned [B, R_max, V_local] logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch


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

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


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
    """logits [b, L, V], positions [b, R] -> [b, R, V] (the logits that score each response token)."""
    idx = positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, idx)
