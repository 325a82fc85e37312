"""The two model passes of a training step, both through Megatron's forward/backward schedule.

1. Teacher pass (forward only, no grad): teacher sequences (teacher prompt + the student's response ids)
   -> on the last pipeline stage, the teacher logits at the response positions, kept per micro-batch
   (or, when all micro-batches must be held at once and the loss needs no full-distribution divergence,
   only the teacher's per-token log-prob and entropy).
1b. Reference pass (only when loss.kl_coef > 0; forward only): the STUDENT sequences through the
   reference policy (the initial weights) -> per-token log-probs of the response, kept per micro-batch
   ([b, R] floats: the vocabulary is reduced right away, so this costs no logits memory).
   (The teacher and reference passes are forward-only passes of one function, `_forward_scores`.)
2. Student pass (forward + backward): student sequences -> response logits -> ONE fused `token_stats`
   call with the teacher logits (student log-prob with grad, teacher log-prob, teacher entropy, and the
   KL for OPSD) -> token advantages -> `policy_loss` divided by the GLOBAL number of valid tokens.

The loss functions return (loss, num_tokens, metrics) with `config.calculate_per_token_loss = True`, so
Megatron's schedule neither divides by the token count nor by the number of micro-batches: the loss is
already normalised globally (data-parallel ranks x micro-batches sum to the global token mean). The
student pass's metrics are one `metrics.Record` per micro-batch (scalars with their counts, and the
teacher entropy per valid token for the global quantile); trainer/metrics.py reduces them.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..config.schema import LossConfig
from ..losses import divergence_kind, policy_loss, token_advantages
from ..models import causal_mask
from ..ops.vocab_parallel import TokenStats, token_stats
from .batch import MicroBatch, gather_positions
from .metrics import Record


def _run_schedule(model: torch.nn.Module, micro_batches: List[MicroBatch], seq_len: int, ids_attr: str,
                  loss_func: Callable, forward_only: bool) -> list:
    device = next(model.parameters()).device
    mask = causal_mask(seq_len, device)
    pos = torch.arange(seq_len, device=device)[None]

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        ids = getattr(mb, ids_attr).to(device)
        out = chunk(ids, pos.expand(ids.shape[0], -1), mask)
        return out, partial(loss_func, mb)

    model.config.calculate_per_token_loss = True
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_len,
        micro_batch_size=micro_batches[0].student_ids.shape[0], forward_only=forward_only)


VocabReduce = Tuple[int, Optional[object]]   # (true vocab_size, tensor-parallel group)


@torch.no_grad()
def _forward_scores(model: torch.nn.Module, micro_batches: List[MicroBatch], ids_attr: str, pos_attr: str,
                    reduce: Optional[VocabReduce]) -> Dict[int, Union[torch.Tensor, TokenStats]]:
    """Forward-only pass; per micro-batch (last stage) the logits at the response positions [b, R, V_local],
    or with `reduce` only their per-token statistics (TokenStats of the logits against themselves: the
    log-prob of each response token and the entropy, [b, R] each, no logits kept)."""
    kept: Dict[int, Union[torch.Tensor, TokenStats]] = {}

    def keep(mb: MicroBatch, logits: torch.Tensor):
        resp = gather_positions(logits, getattr(mb, pos_attr)).detach()
        if reduce is None:
            kept[mb.index] = resp
        else:
            vocab_size, tp_group = reduce
            kept[mb.index] = token_stats(resp, resp, mb.targets.to(logits.device), group=tp_group,
                                         vocab_size=vocab_size)
        return torch.zeros((), device=logits.device), torch.tensor(mb.num_tokens), {}

    was_training = model.training
    model.eval()
    try:
        _run_schedule(model, micro_batches, getattr(micro_batches[0], ids_attr).shape[1], ids_attr, keep,
                      forward_only=True)
    finally:
        model.train(was_training)
    return kept


def teacher_pass(teacher: torch.nn.Module, micro_batches: List[MicroBatch],
                 reduce: Optional[VocabReduce] = None) -> Dict[int, Union[torch.Tensor, TokenStats]]:
    """{micro-batch index: teacher logits at the response positions [b, R, V_local]} (last stage).

    reduce=(vocab_size, tp_group): keep only the teacher's per-token log-prob and entropy instead, for when
    every micro-batch's teacher output must be held at once (PP > 1, PPO epochs > 1) and the loss needs no
    divergence between the full distributions (all but OPSD's reverse_kl/jsd signals). That is [b, R]
    floats instead of [b, R, V/TP] (e.g. 64 rollouts x 4096 tokens x 19k columns in bf16 = 10 GB for Qwen3
    at TP=8), for 2 more collectives per chunk than the fused student+teacher call.
    """
    return _forward_scores(teacher, micro_batches, "teacher_ids", "teacher_resp_pos", reduce)


def reference_pass(reference: torch.nn.Module, micro_batches: List[MicroBatch], *, vocab_size: int,
                   tp_group) -> Dict[int, torch.Tensor]:
    """Return {micro-batch index: log pi_ref(y_t | x, y_<t) [b, R] fp32} (last stage; empty elsewhere).

    The student's own context (no privileged information): the k3 term of method.md compares the policy
    with its starting point, not with the teacher. Reduced over the vocabulary right away by `token_stats`.
    """
    stats = _forward_scores(reference, micro_batches, "student_ids", "student_resp_pos", (vocab_size, tp_group))
    return {k: v.student_logprob for k, v in stats.items()}  # type: ignore[union-attr]


def micro_batch_loss(stats: TokenStats, mb: MicroBatch, loss_cfg: LossConfig, *, denominator: float,
                     vocab_size: int, old_logprobs: Optional[Dict[int, torch.Tensor]] = None,
                     ref_logprobs: Optional[Dict[int, torch.Tensor]] = None) -> Tuple[torch.Tensor, Record]:
    """One micro-batch's loss (a share of the global mean) and its metric record, from its token statistics.

    No model and no collective: the student pass's per-micro-batch math, testable on its own.
    """
    device = stats.student_logprob.device
    mask = mb.mask.to(device)
    old = stats.student_logprob.detach()
    if old_logprobs is not None:
        old = old_logprobs.setdefault(mb.index, old)
    adv, weight_metrics = token_advantages(
        mb.advantages.to(device), stats.student_logprob.detach(), stats.teacher_logprob,
        stats.teacher_entropy, mask, loss_cfg, vocab_size=vocab_size, return_metrics=True)
    extra = {"kl": stats.kl} if stats.kl is not None else {}
    if loss_cfg.kl_coef > 0:
        ref = (ref_logprobs or {}).get(mb.index)   # missing: policy_loss names what is needed
        extra["ref_logprob"] = ref.to(device) if ref is not None else None
    loss, metrics = policy_loss(stats.student_logprob, old, adv, mask, loss_cfg, denominator=denominator, **extra)
    tokens = {}
    if stats.teacher_entropy is not None:   # for the global teacher_entropy_p90
        tokens["teacher_entropy"] = stats.teacher_entropy.detach()[mask].float().cpu()
    return loss, Record({**weight_metrics, **metrics}, tokens)


def student_pass(model: torch.nn.Module, micro_batches: List[MicroBatch],
                 teacher_logits: Dict[int, Union[torch.Tensor, TokenStats]],
                 loss_cfg: LossConfig, *, denominator: float, vocab_size: int, tp_group,
                 old_logprobs: Optional[Dict[int, torch.Tensor]] = None,
                 ref_logprobs: Optional[Dict[int, torch.Tensor]] = None,
                 forward_only: bool = False) -> List[Record]:
    """Forward + backward over all micro-batches; returns one metric Record per micro-batch (last stage).

    `old_logprobs` (PPO epochs > 1): the behaviour policy's log-probs per micro-batch; None means
    on-policy (old = current, detached), the usual single-epoch case. Fills `old_logprobs` when given
    an empty dict. `denominator`: the global number of valid tokens (loss.aggregation=token_mean) or of
    sequences (seq_mean_token_mean) over all data-parallel ranks and micro-batches. `ref_logprobs`: the
    reference pass's output, required when loss.kl_coef > 0.
    """
    kl_mode = divergence_kind(loss_cfg)

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        resp = gather_positions(logits, mb.student_resp_pos)
        targets = mb.targets.to(logits.device)
        teacher = teacher_logits[mb.index]
        if isinstance(teacher, TokenStats):   # reduced by teacher_pass: the student half only
            own = token_stats(resp, resp.detach(), targets, group=tp_group, vocab_size=vocab_size)
            stats = TokenStats(own.student_logprob, teacher.teacher_logprob, teacher.teacher_entropy, None, None)
        else:
            stats = token_stats(resp, teacher, targets, group=tp_group, vocab_size=vocab_size, kl=kl_mode)
        loss, record = micro_batch_loss(stats, mb, loss_cfg, denominator=denominator, vocab_size=vocab_size,
                                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        return loss, torch.tensor(mb.num_tokens), record

    return _run_schedule(model, micro_batches, micro_batches[0].student_ids.shape[1], "student_ids",
                         loss_func, forward_only=forward_only)
