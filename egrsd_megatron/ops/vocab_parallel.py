"""Fused vocabulary-parallel token statistics for EGRSD: lS, lT, H_T (+ H_S, KL / JSD) per token.

Under tensor parallelism each rank holds logits for a contiguous slice of the vocabulary (Megatron's layout:
rank r holds ids [r * V_local, (r + 1) * V_local)). `token_stats` computes, per token and over the FULL
vocabulary, without ever gathering it:

    student_logprob  log pS(y)                       (gradient flows to student_logits)
    teacher_logprob  log pT(y)                       (no gradient)
    teacher_entropy  H_T = -sum_v pT log pT          (no gradient)
    student_entropy  H_S = -sum_v pS log pS          (optional, gradient)
    kl               "reverse": KL(pS||pT) = sum_v pS (log pS - log pT)      (optional, gradient)
                     "forward": KL(pT||pS) = sum_v pT (log pT - log pS)
                     ("jsd", beta): beta KL(pT||M) + (1 - beta) KL(pS||M),  M = beta pT + (1 - beta) pS

With a sampling temperature T every distribution above is softmax(z / T) (pS and pT alike: the policy
the rollout engine sampled from, and the teacher scored at the same T, as verl / TRL do). The scaling is
fused: (z - m) / T is formed inside each fp32 work block, never as a full copy of the logits, and the
backward carries the chain-rule 1 / T. T = 1 runs exactly the T-free operations (bitwise the kernel before
temperatures existed). The teacher entropy (the gate's) may be taken at its own temperature T_H
(`entropy_temperature`, e.g. 1.0 while T = 0.7): two more local sums per row in the same pass, paid only
when T_H != T.

Collectives per chunk of `chunk_size` tokens in forward: one all-reduce MAX and one all-reduce SUM (a third
SUM only for JSD); none in backward. The math and memory plan are in `vocab_parallel_fn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from .vocab_parallel_fn import FnSpec, NonFiniteLogitsError, TokenStatsFunction

__all__ = ["TokenStats", "OneStats", "token_stats", "token_stats_one", "NonFiniteLogitsError", "DEFAULT_BLOCK_ELEMS"]

# Elements of one fp32 work block (rows x V_local; at least one row), three such buffers per call.
# CPU: ~1 MiB per buffer, so the several passes over a block hit the L2 cache (measured ~1.5-2x faster
# than 16 MiB blocks on this 2-core box). GPU: 16 MiB per buffer, large enough that kernel launches are
# amortised and still far below one [chunk, V_local] fp32 copy.
DEFAULT_BLOCK_ELEMS = {"cpu": 1 << 18, "cuda": 1 << 22}

KLSpec = Union[None, str, Tuple[str, float]]


@dataclass
class TokenStats:
    """Per-token statistics, each fp32 and shaped like `targets` (the teacher's None when a caller scored
    no teacher: the trainer's student-only case)."""

    student_logprob: torch.Tensor
    teacher_logprob: Optional[torch.Tensor]
    teacher_entropy: Optional[torch.Tensor]
    student_entropy: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


@dataclass
class OneStats:
    """`token_stats_one`'s output, fp32 and shaped like `targets`: log p(y) (gradient to the logits) and
    H(p) (no gradient; None when not asked)."""

    logprob: torch.Tensor
    entropy: Optional[torch.Tensor] = None


def _parse_kl(kl: KLSpec) -> Tuple[Optional[str], float]:
    if kl is None:
        return None, 0.0
    if isinstance(kl, str) and kl in ("reverse", "forward"):
        return kl, 0.0
    if isinstance(kl, (tuple, list)) and len(kl) == 2 and kl[0] == "jsd":
        beta = float(kl[1])
        if not 0.0 < beta < 1.0:
            raise ValueError(
                f"kl=('jsd', {kl[1]!r}): beta must lie strictly between 0 and 1 "
                f"(at 0 or 1 the generalized JSD is identically zero)"
            )
        return "jsd", beta
    raise ValueError(
        f"kl={kl!r} is not understood: use None, 'reverse' (KL(pS||pT)), 'forward' (KL(pT||pS)) "
        f"or ('jsd', beta) with 0 < beta < 1"
    )


def _group_layout(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    if group is None:
        return 1, 0
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "token_stats: a process group was given but torch.distributed is not initialised: "
            "call init_distributed first, or pass group=None for a full vocabulary"
        )
    return dist.get_world_size(group), dist.get_rank(group)


def _validate(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [N, V_local] or [B, T, V_local], got shape {tuple(t.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits shape {tuple(student.shape)} != teacher_logits shape "
            f"{tuple(teacher.shape)}: both must hold the same tokens and the same vocabulary slice"
        )
    if student.device != teacher.device or targets.device != student.device:
        raise ValueError(
            f"student_logits ({student.device}), teacher_logits ({teacher.device}) and targets "
            f"({targets.device}) must be on one device"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(student.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the logits' leading shape "
            f"{tuple(student.shape[:-1])} (student_logits is {tuple(student.shape)})"
        )


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"targets[{i}] (flattened) = {int(targets[i])} lies outside [0, vocab_size={vocab_size}): "
            f"fix the labels (ignore-index / padding ids must be replaced before token_stats)"
        )


def _inverse_temperature(name: str, value: float) -> float:
    t = float(value)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(
            f"token_stats: {name}={value!r} must be a finite number > 0 (the statistics are of "
            f"softmax(z / {name}); greedy decoding has no distribution to score)"
        )
    return 1.0 / t


def token_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_size: int = 1024,
    student_entropy: bool = False,
    kl: KLSpec = None,
    check_finite: bool = True,
    block_elems: Optional[int] = None,
    temperature: float = 1.0,
    entropy_temperature: Optional[float] = None,
    inplace_backward: bool = False,
) -> TokenStats:
    """Fused full-vocabulary token statistics from vocabulary-parallel logits.

    student_logits, teacher_logits: [N, V_local] or [B, T, V_local], this rank's contiguous vocabulary slice
      (bf16 or fp32; fp32 math per block; never modified unless inplace_backward). targets: global token ids
      shaped like the leading dims. group: the tensor-parallel group (None: one process, full vocabulary).
      vocab_size: true vocabulary size; columns at or beyond it (Megatron padding) are excluded everywhere
      (default: V_local x TP).
    chunk_size: tokens per collective round (2 all-reduces each, 3 for JSD). block_elems: fp32 elements of one
      work buffer (rows x V_local), which bounds the extra memory. check_finite: raise NonFiniteLogitsError on a
      NaN / +inf logit or an all -inf token (costs one host sync per chunk). block_elems None: the
      per-device DEFAULT_BLOCK_ELEMS.
    temperature: T > 0; every statistic (log-probs, entropies, KL / JSD) is of softmax(z / T), gradients
      included (d/dz = (1 / T) d/d(z / T)). 1.0 (default): bitwise the untempered statistics.
    entropy_temperature: T_H for `teacher_entropy` only (H of softmax(z_T / T_H)); None: T_H = T. Everything
      else, the JSD's internal teacher entropy included, stays at T.
    Reduced use with one set of logits, token_stats(z, z.detach(), y, temperature=T): log pi_T(y) and H(pi_T).
    Gradients flow to student_logits through student_logprob, student_entropy and kl; never to teacher_logits.
    inplace_backward: the backward writes the gradient into student_logits' own storage (no second
      [N, V_local] tensor; values bitwise those of the default). Only for logits nothing reads after the
      backward (e.g. a fresh gather of the model's output); student_logits must not be a leaf tensor.
    """
    _validate(student_logits, teacher_logits, targets)
    _check_inplace(student_logits, inplace_backward)
    mode, beta = _parse_kl(kl)
    spec, s2, y = _spec(
        student_logits,
        targets,
        group,
        vocab_size,
        chunk_size,
        block_elems,
        temperature,
        entropy_temperature,
        check_finite,
        student_entropy=bool(student_entropy),
        kl=mode,
        beta=beta,
        inplace_grad=bool(inplace_backward),
    )
    lead = targets.shape
    t2 = teacher_logits.reshape(-1, s2.shape[-1])
    if y.numel() == 0:
        z = lambda: s2.new_zeros(lead, dtype=torch.float32) + 0.0 * s2.sum()  # noqa: E731 - keeps the graph
        return TokenStats(z(), z().detach(), z().detach(), z() if student_entropy else None, z() if mode else None)
    ls, lt, ht, hs, klv = TokenStatsFunction.apply(s2, t2.detach(), y, spec)
    return TokenStats(
        student_logprob=ls.view(lead),
        teacher_logprob=lt.view(lead),
        teacher_entropy=ht.view(lead),
        student_entropy=hs.view(lead) if student_entropy else None,
        kl=klv.view(lead) if mode else None,
    )


def token_stats_one(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    entropy: bool = True,
    chunk_size: int = 1024,
    check_finite: bool = True,
    block_elems: Optional[int] = None,
    temperature: float = 1.0,
    entropy_temperature: Optional[float] = None,
    inplace_backward: bool = False,
) -> OneStats:
    """The one-distribution mode of `token_stats`: log p(y) and H(p) of ONE set of logits, p = softmax(z / T).

    For the passes that score one model: the reduced teacher pass (log pT and H_T), the reference pass
    (log p_ref) and the student when no teacher is read (log pS with its gradient). Same arguments and
    layout as `token_stats`; `entropy` (H at `entropy_temperature`, None: at T; no gradient) may be left out
    when only the log-prob is needed. Per chunk: one all-reduce MAX of [1, n] and one all-reduce SUM of
    [2, n] (log-prob only) to [4, n] (entropy at its own T_H) -- the same two collectives as the fused
    call, half the local work and half the payload. log p(y) and its gradient are bitwise what
    token_stats(z, z.detach(), y) gives for student_logprob (the same operations in the same order).
    `inplace_backward`: as token_stats' (the gradient into `logits`' own storage).
    """
    _validate(logits, logits, targets)
    _check_inplace(logits, inplace_backward)
    spec, z2, y = _spec(
        logits,
        targets,
        group,
        vocab_size,
        chunk_size,
        block_elems,
        temperature,
        entropy_temperature if entropy else None,
        check_finite,
        single=True,
        single_entropy=bool(entropy),
        inplace_grad=bool(inplace_backward),
    )
    lead = targets.shape
    if y.numel() == 0:
        zero = z2.new_zeros(lead, dtype=torch.float32)
        return OneStats(zero + 0.0 * z2.sum(), zero.clone() if entropy else None)
    ls, _, h, _, _ = TokenStatsFunction.apply(z2, z2.detach(), y, spec)
    return OneStats(ls.view(lead), h.view(lead) if entropy else None)


def _check_inplace(logits: torch.Tensor, inplace: bool) -> None:
    """inplace_backward overwrites the logits with their gradient: refused for a leaf (a parameter-like
    tensor would hold its own gradient, and autograd would hand that storage out as .grad)."""
    if inplace and logits.requires_grad and logits.is_leaf:
        raise ValueError(
            "token_stats(inplace_backward=True): the logits are a leaf tensor; pass the model's output (or "
            "a gather of it), whose storage nothing else reads after the backward, or inplace_backward=False"
        )


def _spec(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    vocab_size: Optional[int],
    chunk_size: int,
    block_elems: Optional[int],
    temperature: float,
    entropy_temperature: Optional[float],
    check_finite: bool,
    **mode,
) -> Tuple[FnSpec, torch.Tensor, torch.Tensor]:
    """(FnSpec, logits as [N, V_local], targets as [N] long) after the layout checks shared by both modes."""
    if block_elems is None:
        block_elems = DEFAULT_BLOCK_ELEMS.get(logits.device.type, DEFAULT_BLOCK_ELEMS["cuda"])
    if chunk_size < 1 or block_elems < 1:
        raise ValueError(f"chunk_size={chunk_size} and block_elems={block_elems} must be >= 1")
    inv_t = _inverse_temperature("temperature", temperature)
    inv_h = None
    if entropy_temperature is not None and float(entropy_temperature) != float(temperature):
        inv_h = _inverse_temperature("entropy_temperature", entropy_temperature)
    tp, rank = _group_layout(group)
    v_local = logits.shape[-1]
    if vocab_size is None:
        vocab_size = v_local * tp
    if not 1 <= vocab_size <= v_local * tp:
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the vocabulary slice: student_logits has "
            f"V_local={v_local} columns on each of {tp} rank(s) of the group, covering "
            f"{v_local * tp} ids; pass the group the logits were split over and the true vocab_size"
        )
    y = targets.reshape(-1).long()
    _check_targets(y, vocab_size)
    vocab_start = rank * v_local
    valid = max(0, min(v_local, vocab_size - vocab_start))
    chunk = int(chunk_size)
    full = dict(student_entropy=False, kl=None, beta=0.0)
    full.update(mode)
    spec = FnSpec(
        group=group,
        vocab_start=vocab_start,
        valid=valid,
        chunk=chunk,
        block_rows=max(1, min(chunk, block_elems // max(valid, 1))),
        check_finite=bool(check_finite),
        inv_t=inv_t,
        entropy_inv_t=inv_h,
        **full,
    )
    return spec, logits.reshape(-1, v_local), y
