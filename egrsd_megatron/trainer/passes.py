"""The two model passes of a training step, both through Megatron's forward/backward schedule.

1. Teacher pass (forward only, no grad): teacher sequences (teacher prompt + the student's response ids)
   -> on the last pipeline stage, the teacher logits at the response positions, kept per micro-batch
   (or, when all micro-batches must be held at once and the loss needs no full-distribution divergence,
   only the teacher's per-token log-prob and entropy).
1b. Reference pass (only when loss.kl_coef > 0; forward only): the STUDENT sequences through the
   reference policy (the initial weights) -> per-token log-probs of the response, kept per micro-batch
   ([b, R] floats: the vocabulary is reduced right away, so this costs no logits memory).
   (The teacher and reference passes are forward-only passes of one function, `_forward_scores`; reduced,
   they score their one set of logits with the one-distribution `token_stats_one`.)
2. Student pass (forward + backward): student sequences -> response logits -> ONE fused `token_stats`
   call with the teacher logits (student log-prob with grad, teacher log-prob, teacher entropy, and the
   KL for OPSD) -> token advantages -> `policy_loss` divided by the GLOBAL number of valid tokens. With a
   reduced teacher pass, or none at all (a loss that reads no teacher input: grpo), the student's log-prob
   comes from `token_stats_one` instead.

Every statistic is of the distribution the rollout engine sampled from, softmax(z / T) with T =
rollout.temperature (`Scoring`; docs/method.md "Sampling temperature"), fused into `token_stats`' chunks.
A NaN/+inf logit (token_stats' check, raised on every tensor-parallel rank together) does not stop the job:
the micro-batch's loss becomes NaN, so the step's non-finite guard (trainer/update.py) skips it on every rank.

Micro-batches are padded or packed (trainer/batch.py; `parallel.max_tokens_per_micro_batch`): a packed one
runs as one [1, T] row with Megatron's PackedSeqParams (`_run_schedule`), and its response logits are
gathered into the same [n, R, V_local] layout, so the scoring and the losses below do not know the difference
(the lookahead gets the pack's `segment_ids`).

The loss functions return (loss, num_tokens, metrics) with `config.calculate_per_token_loss = True`, so
Megatron's schedule neither divides by the token count nor by the number of micro-batches: the loss is
already normalised globally (data-parallel ranks x micro-batches sum to the global token mean). The
student pass's metrics are one `metrics.Record` per micro-batch (scalars with their counts, the teacher
entropy per valid token for the global quantile, and the tokens each pass computed with their padding
fraction, `batch.pass_token_metrics`); trainer/metrics.py reduces them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..config.schema import LossConfig
from ..losses import divergence_kind, policy_loss, token_advantages
from ..models import causal_mask, packed_seq_params
from ..ops.vocab_parallel import NonFiniteLogitsError, OneStats, TokenStats, token_stats, token_stats_one
from .batch import MicroBatch, gather_positions, pass_token_metrics
from .metrics import Record


def _run_schedule(
    model: torch.nn.Module,
    micro_batches: List[MicroBatch],
    side: str,
    loss_func: Callable,
    forward_only: bool,
) -> list:
    """Megatron's forward/backward schedule over `micro_batches`' `side` ("student" | "teacher") ids.

    Padded: [b, L] ids with the explicit causal mask, L the same for every micro-batch (the schedule's fixed
    [L, b, H] activation shape at PP > 1). Packed: [1, T] ids, no mask, PackedSeqParams (THD, cu_seqlens;
    RoPE positions restart per sequence), T each pack's own. At PP > 1 that takes Megatron's
    `variable_seq_lengths`: before every activation (or gradient) p2p send, the two stages exchange its
    [3] int64 shape (p2p_communication._communicate_shapes, a batch_isend_irecv of its own; on gloo too)
    and the receiver allocates that shape instead of [seq_length, micro_batch_size, H], so no pack is
    padded (`seq_length` below is then unused). Nothing else needs a divisible length here: sequence
    parallelism, which would need T % TP == 0, is off in this project."""
    device = next(model.parameters()).device
    ids0 = getattr(micro_batches[0], f"{side}_ids")
    lengths = {getattr(mb, f"{side}_ids").shape[1] for mb in micro_batches}
    packed = micro_batches[0].packed
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    if len(lengths) > 1 and pipelined and not packed:
        raise ValueError(f"{side} micro-batches of lengths {sorted(lengths)}: pipeline parallelism needs one length")
    seq_len = max(lengths)
    mask = None if packed else causal_mask(seq_len, device)
    pos = torch.arange(seq_len, device=device)[None]

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        ids = getattr(mb, f"{side}_ids").to(device)
        pack = getattr(mb, f"{side}_pack")
        if pack is not None:
            params = packed_seq_params(pack.cu_seqlens, pack.max_seqlen, device)
            out = chunk(ids, pack.position_ids.to(device), None, packed_seq_params=params)
        elif mb.packed:
            raise ValueError(f"micro-batch {mb.index} was packed without {side} sequences (no {side} pass planned)")
        else:
            out = chunk(ids, pos.expand(ids.shape[0], -1), mask)
        return out, partial(loss_func, mb)

    model.config.calculate_per_token_loss = True
    # Per call: the same model runs packed and padded passes in the tests (the shape exchange costs two
    # small messages per send, for nothing when every micro-batch has one shape).
    model.config.variable_seq_lengths = packed and pipelined
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=ids0.shape[0],
        forward_only=forward_only,
    )


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """How the step's per-token statistics are computed: over the true vocabulary of the tensor-parallel
    shards, of softmax(z / temperature), the teacher entropy at `entropy_temperature` (None: at temperature)."""

    vocab_size: int
    tp_group: Any = None
    temperature: float = 1.0
    entropy_temperature: Optional[float] = None

    def stats(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, kl: Any = None, inplace: bool = False
    ) -> Optional[TokenStats]:
        """token_stats of the two sets of logits, or None when a logit is NaN/+inf (on every TP rank alike).
        `inplace`: the backward writes the gradient into `student`'s storage (token_stats' inplace_backward)."""
        try:
            return token_stats(
                student,
                teacher,
                targets,
                group=self.tp_group,
                vocab_size=self.vocab_size,
                kl=kl,
                temperature=self.temperature,
                entropy_temperature=self.entropy_temperature,
                inplace_backward=inplace,
            )
        except NonFiniteLogitsError as e:
            log.warning("skipping this step: %s", e)
            return None

    def one(
        self, logits: torch.Tensor, targets: torch.Tensor, entropy: bool, inplace: bool = False
    ) -> Optional[OneStats]:
        """token_stats_one of one set of logits (log-prob; the entropy at `entropy_temperature` when asked),
        or None when a logit is NaN/+inf (on every TP rank alike). `inplace`: as `stats`'."""
        try:
            return token_stats_one(
                logits,
                targets,
                group=self.tp_group,
                vocab_size=self.vocab_size,
                entropy=entropy,
                temperature=self.temperature,
                entropy_temperature=self.entropy_temperature,
                inplace_backward=inplace,
            )
        except NonFiniteLogitsError as e:
            log.warning("skipping this step: %s", e)
            return None


def scoring_for(cfg: Any, vocab_size: int, tp_group: Any) -> Scoring:
    """The step's `Scoring` from an ExperimentConfig: rollout.temperature and loss.gate.entropy_at."""
    entropy_t = None if cfg.loss.gate.entropy_at == "sampling" else 1.0
    return Scoring(vocab_size, tp_group, float(cfg.rollout.temperature), entropy_t)


Kept = Union[torch.Tensor, OneStats, None]


@torch.no_grad()
def _forward_scores(
    model: torch.nn.Module,
    micro_batches: List[MicroBatch],
    side: str,
    reduce: Optional[Scoring],
    entropy: bool = True,
) -> Dict[int, Kept]:
    """Forward-only pass; per micro-batch (last stage) the logits at the response positions [b, R, V_local],
    or with `reduce` only their per-token statistics (the one-distribution `token_stats_one`: the log-prob
    of each response token and, with `entropy`, the entropy, [b, R] each, no logits kept; None for
    non-finite logits)."""
    kept: Dict[int, Kept] = {}

    def keep(mb: MicroBatch, logits: torch.Tensor):
        resp = gather_positions(logits, getattr(mb, f"{side}_resp_pos")).detach()
        if reduce is None:
            kept[mb.index] = resp
        else:
            kept[mb.index] = reduce.one(resp, mb.targets.to(logits.device), entropy=entropy)
        return torch.zeros((), device=logits.device), torch.tensor(mb.num_tokens), {}

    was_training = model.training
    model.eval()
    try:
        _run_schedule(model, micro_batches, side, keep, forward_only=True)
    finally:
        model.train(was_training)
    return kept


def teacher_pass(
    teacher: torch.nn.Module, micro_batches: List[MicroBatch], reduce: Optional[Scoring] = None
) -> Dict[int, Kept]:
    """{micro-batch index: teacher logits at the response positions [b, R, V_local]} (last stage).

    reduce=Scoring: keep only the teacher's per-token log-prob and entropy instead, for when
    every micro-batch's teacher output must be held at once (PP > 1, PPO epochs > 1) and the loss needs no
    divergence between the full distributions (all but OPSD's reverse_kl/jsd signals). That is [b, R]
    floats instead of [b, R, V/TP] (e.g. 64 rollouts x 4096 tokens x 19k columns in bf16 = 10 GB for Qwen3
    at TP=8), for 2 more collectives per chunk than the fused student+teacher call (the teacher's and the
    student's one-distribution calls, 2 each, instead of the fused call's 2).
    """
    return _forward_scores(teacher, micro_batches, "teacher", reduce)


def reference_pass(
    reference: torch.nn.Module, micro_batches: List[MicroBatch], scoring: Scoring
) -> Dict[int, Optional[torch.Tensor]]:
    """Return {micro-batch index: log pi_ref(y_t | x, y_<t) [b, R] fp32} (last stage; empty elsewhere).

    The student's own context (no privileged information): the k3 term of method.md compares the policy
    with its starting point, not with the teacher. Reduced over the vocabulary right away by `token_stats`.
    """
    stats = _forward_scores(reference, micro_batches, "student", scoring, entropy=False)
    return {k: (v.logprob if v is not None else None) for k, v in stats.items()}  # type: ignore[union-attr]


def micro_batch_loss(
    stats: TokenStats,
    mb: MicroBatch,
    loss_cfg: LossConfig,
    *,
    denominator: float,
    vocab_size: int,
    old_logprobs: Optional[Dict[int, torch.Tensor]] = None,
    ref_logprobs: Optional[Dict[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Record]:
    """One micro-batch's loss (a share of the global mean) and its metric record, from its token statistics.

    No model and no collective: the student pass's per-micro-batch math, testable on its own.
    """
    device = stats.student_logprob.device
    mask = mb.mask.to(device)
    old = stats.student_logprob.detach()
    if old_logprobs is not None:
        old = old_logprobs.setdefault(mb.index, old)
    # rho reads the behaviour (old) student log-prob: with PPO epochs > 1 the token weights stay those of
    # the policy that sampled, fixed inside the trust region (with one epoch old is the current lS).
    adv, weight_metrics = token_advantages(
        mb.advantages.to(device),
        old,
        stats.teacher_logprob,
        stats.teacher_entropy,
        mask,
        loss_cfg,
        vocab_size=vocab_size,
        segment_ids=mb.segment_ids,
        return_metrics=True,
    )
    extra = {"kl": stats.kl} if stats.kl is not None else {}
    if loss_cfg.kl_coef > 0:
        ref = (ref_logprobs or {}).get(mb.index)  # missing: policy_loss names what is needed
        extra["ref_logprob"] = ref.to(device) if ref is not None else None
    loss, metrics = policy_loss(stats.student_logprob, old, adv, mask, loss_cfg, denominator=denominator, **extra)
    tokens = {}
    if stats.teacher_entropy is not None:  # for the global teacher_entropy_p90
        tokens["teacher_entropy"] = stats.teacher_entropy.detach()[mask].float().cpu()
    return loss, Record({**weight_metrics, **metrics, **engine_mismatch(mb, old)}, tokens)


def engine_mismatch(mb: MicroBatch, behaviour_logprob: torch.Tensor) -> Dict[str, float]:
    """The rollout engine's vs the trainer's log-prob of each sampled token, delta = |lE - lS_old| over valid
    tokens: logprob_diff_mean, logprob_diff_max and prob_ratio_error = mean(exp(delta) - 1) (NeMo-RL's token
    probability error). ~0 when the engine holds the current weights and samples from softmax(z / T); a stale
    refit, another temperature or a low-precision engine shows here. Empty without engine log-probs."""
    if mb.engine_logprobs is None or mb.num_tokens == 0:
        return {}
    mask = mb.mask.to(behaviour_logprob.device)
    delta = (mb.engine_logprobs.to(behaviour_logprob.device) - behaviour_logprob.float()).abs()[mask].double()
    return {
        "logprob_diff_mean": float(delta.mean()),
        "logprob_diff_max": float(delta.max()),
        "prob_ratio_error": float(torch.expm1(delta).mean()),
    }


def nonfinite_loss(logits: torch.Tensor, mb: MicroBatch) -> Tuple[torch.Tensor, Record]:
    """A NaN loss with a graph through `logits` (the backward still runs through the pipeline schedule, and
    the NaN gradients make the step's non-finite guard skip the step on every rank)."""
    return logits.sum() * float("nan"), Record({"loss": float("nan"), "nonfinite_logits": 1.0})


def student_pass(
    model: torch.nn.Module,
    micro_batches: List[MicroBatch],
    teacher_logits: Optional[Dict[int, Kept]],
    loss_cfg: LossConfig,
    *,
    denominator: float,
    scoring: Scoring,
    old_logprobs: Optional[Dict[int, torch.Tensor]] = None,
    ref_logprobs: Optional[Dict[int, torch.Tensor]] = None,
    forward_only: bool = False,
) -> List[Record]:
    """Forward + backward over all micro-batches; returns one metric Record per micro-batch (last stage).

    `old_logprobs` (PPO epochs > 1): the behaviour policy's log-probs per micro-batch; None means
    on-policy (old = current, detached), the usual single-epoch case. Fills `old_logprobs` when given
    an empty dict. `denominator`: the global number of valid tokens (loss.aggregation=token_mean) or of
    sequences (seq_mean_token_mean) over all data-parallel ranks and micro-batches. `ref_logprobs`: the
    reference pass's output, required when loss.kl_coef > 0. `teacher_logits` None: no teacher pass ran
    (a loss that reads no teacher input, losses.reads_teacher): the student's log-prob alone, from the
    one-distribution `token_stats_one`.
    """
    kl_mode = divergence_kind(loss_cfg)

    def loss_func(mb: MicroBatch, logits: torch.Tensor):
        # A fresh gather that only token_stats reads: its backward writes the gradient into resp's storage
        # (inplace), so the response logits and their gradient are never held at once.
        resp = gather_positions(logits, mb.student_resp_pos)
        targets = mb.targets.to(logits.device)
        teacher = teacher_logits[mb.index] if teacher_logits is not None else None
        stats: Optional[TokenStats] = None
        if teacher_logits is None or isinstance(teacher, OneStats):  # no teacher / reduced: the student alone
            own = scoring.one(resp, targets, entropy=False, inplace=not forward_only)
            if own is not None:
                lt, ht = (teacher.logprob, teacher.entropy) if teacher is not None else (None, None)
                stats = TokenStats(own.logprob, lt, ht, None, None)
        elif teacher is not None:
            stats = scoring.stats(resp, teacher, targets, kl=kl_mode, inplace=not forward_only)
        ref_missing = ref_logprobs is not None and ref_logprobs.get(mb.index, 0) is None
        if stats is None or ref_missing:  # a non-finite logit in this or an earlier pass
            loss, record = nonfinite_loss(resp, mb)
        else:
            loss, record = micro_batch_loss(
                stats,
                mb,
                loss_cfg,
                denominator=denominator,
                vocab_size=scoring.vocab_size,
                old_logprobs=old_logprobs,
                ref_logprobs=ref_logprobs,
            )
        record.values.update(pass_token_metrics(mb, teacher=teacher_logits is not None))
        return loss, torch.tensor(mb.num_tokens), record

    return _run_schedule(model, micro_batches, "student", loss_func, forward_only=forward_only)
