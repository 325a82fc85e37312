"""The update of a step: teacher (and reference) passes, PPO epochs of student passes, non-finite guard,
optimizer and scheduler step, phase timings.

Pass ordering. Teacher logits at the response positions are the step's largest buffer ([b, R, V/TP] per
micro-batch). Without pipeline parallelism and with one PPO epoch each micro-batch's teacher pass runs
right before its student pass ("interleaved"), so one micro-batch of them is alive at a time. Otherwise
every micro-batch's teacher output is needed at once: then only its per-token log-prob and entropy are
kept, unless the loss compares the full distributions (OPSD reverse_kl / jsd). The reference pass (loss.kl_coef
> 0) keeps [b, R] log-probs per micro-batch, so it runs for all micro-batches up front. A loss that reads
no teacher input (grpo; losses.reads_teacher) runs no teacher pass at all, unless teacher.log_entropy asks
for the teacher-entropy metrics (`teacher_pass_needed`).

Non-finite guard: when the gradient norm or the loss is not finite on ANY rank, every rank skips the
optimizer step (the decision is all-reduced, so the replicas never diverge) and the step counts as skipped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import ExperimentConfig, LossConfig
from ..distributed.grads import clip_grads, finalize_grads, zero_grads
from ..losses import divergence_kind, teacher_pass_needed
from .batch import MicroBatch, Sample
from .metrics import Record
from .passes import Scoring, reference_pass, student_pass, teacher_pass


@dataclass
class UpdateResult:
    records: List[Record]  # the last epoch's micro-batch records (last pipeline stage; empty elsewhere)
    grad_norm: float  # before clipping, of the last epoch
    skipped: bool  # the non-finite guard skipped the optimizer step
    timings: Dict[str, float] = field(default_factory=dict)


def interleaved(pp_size: int, ppo_epochs: int) -> bool:
    """Whether each micro-batch's teacher pass runs right before its student pass (see the module docstring)."""
    return pp_size == 1 and ppo_epochs == 1


def local_denominator(samples: Sequence[Sample], aggregation: str) -> int:
    """This rank's share of the loss denominator: sequences (seq_mean_token_mean) or valid tokens (token_mean)."""
    return len(samples) if aggregation == "seq_mean_token_mean" else sum(len(s.response) for s in samples)


def nonfinite_anywhere(grad_norm: float, loss: float, all_reduce_max: Callable[[float], float]) -> bool:
    """True when the gradient norm or the loss is non-finite on any rank (`all_reduce_max` over the world)."""
    bad = 0.0 if (math.isfinite(grad_norm) and math.isfinite(loss)) else 1.0
    return all_reduce_max(bad) > 0


def run_update(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    reference: Optional[torch.nn.Module],
    optimizer,
    scheduler,
    mbs: List[MicroBatch],
    *,
    denominator: float,
    scoring: Scoring,
    pp_size: int,
    all_reduce_max: Callable[[float], float],
    loss_cfg: Optional[LossConfig] = None,
) -> UpdateResult:
    """Teacher/reference/student passes and the optimizer step for one step's micro-batches.

    `loss_cfg`: this step's loss knobs (a scheduled value, e.g. RLSD's lam, already applied); default cfg.loss."""
    loss_cfg = loss_cfg or cfg.loss
    timings: Dict[str, float] = {}
    interleave = interleaved(pp_size, cfg.train.ppo_epochs)
    if not teacher_pass_needed(loss_cfg, cfg.teacher.log_entropy):
        teacher = None  # no teacher pass: the student pass scores the student alone
    t_teacher = 0.0
    t2 = time.monotonic()
    teacher_logits: Dict[int, object] = {}
    if not interleave and teacher is not None:  # all teacher outputs at once: reduced unless the loss needs them whole
        reduce = None if divergence_kind(loss_cfg) else scoring
        teacher_logits = teacher_pass(teacher, mbs, reduce=reduce)
        t_teacher = time.monotonic() - t2
    ref_logprobs = None
    if reference is not None:  # [b, R] per micro-batch: small, so all at once
        tt = time.monotonic()
        ref_logprobs = reference_pass(reference, mbs, scoring)
        timings["time/reference"] = time.monotonic() - tt
    pass_args = dict(
        denominator=denominator,
        scoring=scoring,
        old_logprobs={} if cfg.train.ppo_epochs > 1 else None,
        ref_logprobs=ref_logprobs,
    )
    records: List[Record] = []
    grad_norm, skipped = float("nan"), False
    for _epoch in range(cfg.train.ppo_epochs):
        zero_grads([model])
        records, t = _student_passes(loss_cfg, model, teacher, mbs, None if interleave else teacher_logits, pass_args)
        t_teacher += t
        finalize_grads([model])
        tt = time.monotonic()
        grad_norm = clip_grads([model], cfg.optim.clip_grad)
        if nonfinite_anywhere(grad_norm, sum(r.values.get("loss", 0.0) for r in records), all_reduce_max):
            skipped = True
            zero_grads([model])
            break
        optimizer.step()
        timings["time/optimizer"] = timings.get("time/optimizer", 0.0) + time.monotonic() - tt
    scheduler.step()
    timings["time/teacher"] = t_teacher
    timings["time/student"] = (
        time.monotonic() - t2 - t_teacher - timings.get("time/optimizer", 0.0) - timings.get("time/reference", 0.0)
    )
    return UpdateResult(records, grad_norm, skipped, timings)


def _student_passes(
    loss_cfg: LossConfig,
    model: torch.nn.Module,
    teacher: Optional[torch.nn.Module],
    mbs: List[MicroBatch],
    teacher_logits: Optional[Dict[int, object]],
    pass_args: dict,
) -> Tuple[List[Record], float]:
    """One PPO epoch's student passes -> (records, seconds in teacher passes). teacher_logits=None: interleaved,
    each micro-batch's teacher pass right before its student pass (one micro-batch of teacher logits alive).
    teacher=None: no teacher pass at all."""
    if teacher is None:
        return student_pass(model, mbs, None, loss_cfg, **pass_args), 0.0
    if teacher_logits is not None:
        return student_pass(model, mbs, teacher_logits, loss_cfg, **pass_args), 0.0
    records: List[Record] = []
    t_teacher = 0.0
    for mb in mbs:
        tt = time.monotonic()
        one = teacher_pass(teacher, [mb])
        t_teacher += time.monotonic() - tt
        records += student_pass(model, [mb], one, loss_cfg, **pass_args)
        del one
    return records, t_teacher
