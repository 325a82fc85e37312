"""The training step's pieces without a model: metric reduction kinds, the micro-batch loss and its records
(micro-batch size 1 vs 4 gives the same logged values), the non-finite guard, pass ordering, and the typed
rollout record (assignment to model-parallel ranks, seeds, merge, samples)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from egrsd_megatron.config.schema import GateConfig, LossConfig, OpsdConfig
from egrsd_megatron.losses import divergence_kind, group_advantages
from egrsd_megatron.ops.vocab_parallel import TokenStats
from egrsd_megatron.rollout.base import stable_seed
from egrsd_megatron.trainer.batch import Sample, make_micro_batches
from egrsd_megatron.trainer.metrics import KINDS, Record, reduce_metrics, rollout_record
from egrsd_megatron.trainer.passes import micro_batch_loss
from egrsd_megatron.trainer.rollouts import Rollout, Rollouts, assignment, merge, rollout_seeds, to_samples
from egrsd_megatron.trainer.update import interleaved, local_denominator, nonfinite_anywhere

EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- reduction kinds
def test_reduce_kinds_by_hand():
    rank0 = [
        Record(
            {"loss": 0.5, "tokens": 2.0, "gate_mean": 0.25, "live_tokens": 0.0, "ratio_clip_frac": 0.0},
            {"teacher_entropy": torch.tensor([1.0, 3.0])},
        ),
        Record(
            {"loss": -0.25, "tokens": 6.0, "gate_mean": 0.75, "live_tokens": 4.0, "ratio_clip_frac": 0.5},
            {"teacher_entropy": torch.tensor([2.0, 5.0, 4.0])},
        ),
    ]
    rank1 = [
        Record(
            {"loss": 1.0, "tokens": 4.0, "gate_mean": 0.5, "live_tokens": 0.0, "ratio_clip_frac": 0.0},
            {"teacher_entropy": torch.tensor([0.0])},
        ),
        Record({"response_length_max": 7.0, "accuracy": 0.5, "sequences": 2.0}),
        Record({"response_length_max": 9.0, "accuracy": 0.0, "sequences": 6.0}),
    ]
    m = reduce_metrics([rank0, rank1])
    assert m["loss"] == 1.25 and m["tokens"] == 12.0 and m["live_tokens"] == 4.0  # sums
    assert m["gate_mean"] == pytest.approx((0.25 * 2 + 0.75 * 6 + 0.5 * 4) / 12)  # token-weighted
    assert m["ratio_clip_frac"] == 0.5  # weighted by live_tokens: the zero-count records drop out
    assert m["accuracy"] == pytest.approx(0.5 * 2 / 8)  # sequence-weighted
    assert m["response_length_max"] == 9.0
    # the quantile of all six entropies, not a mean of per-record quantiles
    assert m["teacher_entropy_p90"] == pytest.approx(float(np.quantile([1, 3, 2, 5, 4, 0], 0.9)))
    assert set(m) == {
        "loss",
        "tokens",
        "live_tokens",
        "gate_mean",
        "ratio_clip_frac",
        "accuracy",
        "sequences",
        "response_length_max",
        "teacher_entropy_p90",
    }


def test_reduce_empty_weight_is_the_records_own_value():
    recs = [
        Record({"ratio_weight_mean": 1.0, "live_tokens": 0.0}),
        Record({"ratio_weight_mean": 1.0, "live_tokens": 0.0}),
    ]
    assert reduce_metrics([recs])["ratio_weight_mean"] == 1.0


def test_reduce_unknown_metric_names_the_table():
    with pytest.raises(KeyError, match="no reduction kind.*KINDS in trainer/metrics.py"):
        reduce_metrics([[Record({"mystery": 1.0})]])


def test_every_mean_weight_is_a_summed_count():
    for name, kind in KINDS.items():
        if kind.how == "mean":
            assert KINDS[kind.weight].how == "sum", name


def test_rollout_record_and_one_zero_advantage_definition():
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    lengths = [3, 5, 2, 6, 1, 1, 1, 1]
    out = Rollouts([Rollout(k, k // 4, [0] * n, "", k == 7, r) for k, (n, r) in enumerate(zip(lengths, rewards))], 0)
    _, stats = group_advantages(out.rewards(), 4, return_metrics=True)
    rec = rollout_record(out, stats["zero_adv_group_frac"])
    m = reduce_metrics([[rec]])
    assert m["zero_adv_group_frac"] == 0.5 and m["accuracy"] == 0.625 and m["response_length"] == 2.5
    assert m["response_length_max"] == 6.0 and m["truncated_frac"] == 0.125 and m["sequences"] == 8.0


# ---------------------------------------------------------------- micro-batch size invariance
V = 50  # vocabulary size of the synthetic batch (the linear log_vocab gate's h_ref)


def _batch(seed: int, group: int = 4, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 13, (n,), generator=g)]
    rewards = torch.tensor([float(x) for x in torch.randint(0, 2, (n,), generator=g)])
    rewards[:group] = 1.0  # one group with all-equal rewards: A = 0 there (ratio metrics' weights differ)
    rewards[group : group + 2] = torch.tensor([1.0, 0.0])  # and one that is not
    adv = group_advantages(rewards, group)
    samples = [
        Sample([1, 2], [3, 4, 5], list(range(7, 7 + n_i)), float(a), float(r), False, i // group)
        for i, (n_i, a, r) in enumerate(zip(lengths, adv.tolist(), rewards.tolist()))
    ]
    r = max(lengths)
    ls = -5 * torch.rand(n, r, generator=g)
    lt = -5 * torch.rand(n, r, generator=g)
    h = math.log(V) * torch.rand(n, r, generator=g) ** 3  # mostly confident, a few high-entropy spikes
    kl = torch.rand(n, r, generator=g)
    ref = ls - 0.1 * torch.rand(n, r, generator=g)
    old = ls + torch.rand(n, r, generator=g) - 0.5  # a second PPO epoch: some ratios are clipped
    return samples, rewards, TokenStats(ls, lt, h, None, kl), ref, old


def _logged(cfg: LossConfig, samples, rewards, stats: TokenStats, ref, old, mbs_size: int):
    mbs = make_micro_batches(samples, mbs_size)
    denominator = local_denominator(samples, cfg.aggregation)
    records, loss = [], 0.0
    for mb in mbs:
        rows = slice(mb.index * mbs_size, (mb.index + 1) * mbs_size)
        part = TokenStats(
            stats.student_logprob[rows],
            stats.teacher_logprob[rows],
            stats.teacher_entropy[rows],
            None,
            stats.kl[rows] if divergence_kind(cfg) else None,
        )
        lo, rec = micro_batch_loss(
            part,
            mb,
            cfg,
            denominator=denominator,
            vocab_size=V,
            ref_logprobs={mb.index: ref[rows]},
            old_logprobs={mb.index: old[rows]},
        )
        records.append(rec)
        loss += float(lo)
    _, stats_adv = group_advantages(rewards, 4, return_metrics=True)
    out = Rollouts([Rollout(k, s.group, s.response, "", s.truncated, s.reward) for k, s in enumerate(samples)], 0)
    records.append(rollout_record(out, stats_adv["zero_adv_group_frac"]))
    return reduce_metrics([records]), loss


CONFIGS = [
    dict(name="grpo"),
    dict(name="rlsd"),
    dict(name="egrsd", gate=GateConfig(kind="linear")),
    dict(name="cl_egrsd"),
    dict(name="opsd"),
    dict(name="opsd", opsd=OpsdConfig(signal="reverse_kl")),
    dict(name="egrsd", kl_coef=0.5),
    dict(name="cl_egrsd", aggregation="seq_mean_token_mean"),
]


@pytest.mark.parametrize(
    "kw", CONFIGS, ids=lambda kw: "-".join(str(getattr(v, "kind", getattr(v, "signal", v))) for v in kw.values())
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batch_size_does_not_change_logged_values(kw, seed):
    cfg = LossConfig(**kw)
    samples, rewards, stats, ref, old = _batch(seed)
    # One micro-batch of all 8 rollouts: the loss functions' own values over the whole batch (the definition).
    whole, _ = _logged(cfg, samples, rewards, stats, ref, old, 8)
    one, loss1 = _logged(cfg, samples, rewards, stats, ref, old, 1)
    four, loss4 = _logged(cfg, samples, rewards, stats, ref, old, 4)
    assert set(one) == set(four) == set(whole)
    n = sum(len(s.response) for s in samples)
    # Tolerance: a mean is sum_t x_t / N; each record's fp32 mean is its own fp32 sum (error <= n_r eps32 M,
    # M = max |x_t| <= 5 here: log-probs in [-5, 0], entropies <= log V < 5, gates/ratio weights <= 2,
    # |A| <= 1.5) divided by n_r; regrouping the same N terms differs by at most ~N eps32 M.
    tol = n * EPS32 * 5.0
    for k in one:
        if KINDS[k].how in ("sum", "max", "quantile") and k != "loss":
            # counts, maxima and the global quantile: the same numbers exactly
            assert one[k] == four[k] == whole[k], k
        else:
            assert one[k] == pytest.approx(whole[k], abs=tol, rel=0), k
            assert four[k] == pytest.approx(whole[k], abs=tol, rel=0), k
    assert loss1 == pytest.approx(loss4, abs=tol, rel=0) and one["loss"] == pytest.approx(loss1, abs=tol, rel=0)
    assert one["tokens"] == n  # the step's token count, not a per-micro-batch one
    if cfg.name == "cl_egrsd":
        assert one["spike_count"] > 0  # the count is exercised, not 0 = 0
    if not divergence_kind(cfg):
        assert 0 < one["ppo_clip_frac"] < 1


# ---------------------------------------------------------------- the update's decisions
def test_nonfinite_guard_agrees_across_ranks():
    fine = lambda v: v  # noqa: E731 - every other rank finite
    other_bad = lambda v: max(v, 1.0)  # noqa: E731 - some other rank had a nan
    assert not nonfinite_anywhere(0.3, -0.1, fine)
    assert nonfinite_anywhere(float("nan"), 0.0, fine)
    assert nonfinite_anywhere(0.3, float("inf"), fine)
    assert nonfinite_anywhere(0.3, -0.1, other_bad)  # finite here, skipped anyway: the replicas stay equal
    seen = []
    nonfinite_anywhere(0.3, 0.0, lambda v: seen.append(v) or v)
    assert seen == [0.0]  # one collective per call, with this rank's flag


def test_pass_ordering():
    assert interleaved(pp_size=1, ppo_epochs=1)
    assert not interleaved(pp_size=2, ppo_epochs=1)  # PP: every micro-batch's teacher output at once
    assert not interleaved(pp_size=1, ppo_epochs=2)  # epochs reuse the teacher outputs


def test_local_denominator():
    s = [Sample([1], [2], [3, 4, 5], 0.0, 0.0, False, 0), Sample([1], [2], [6], 0.0, 0.0, False, 0)]
    assert local_denominator(s, "token_mean") == 4 and local_denominator(s, "seq_mean_token_mean") == 2


# ---------------------------------------------------------------- the rollout record
def test_assignment_covers_every_rollout_once():
    problems, g = 3, 4
    for mp in (1, 2, 3, 5):
        shares = [assignment(problems, g, r, mp)[1] for r in range(mp)]
        assert sorted(k for s in shares for k in s) == list(range(problems * g))
    problem_of, _ = assignment(problems, g, 0, 1)
    assert problem_of == [0] * 4 + [1] * 4 + [2] * 4


def test_seeds_do_not_depend_on_the_model_parallel_split():
    n = 8
    for mp in (1, 2, 4):
        seeds = {}
        for r in range(mp):
            mine = assignment(2, 4, r, mp)[1]
            seeds.update(zip(mine, rollout_seeds(7, 3, 1, n, mine)))
        assert [seeds[k] for k in range(n)] == [stable_seed(7, 3, n + k) for k in range(n)]


def _rollout(k: int, g: int = 2) -> Rollout:
    return Rollout(index=k, problem=k // g, response=[k, k + 1], text=str(k), truncated=k == 3, reward=k / 4)


def test_merge_orders_by_index_and_sums_timeouts():
    parts = [([_rollout(1), _rollout(3)], 2), ([_rollout(0), _rollout(2)], 1)]
    random.Random(0).shuffle(parts)
    out = merge(parts, 4)
    assert [r.index for r in out.items] == [0, 1, 2, 3] and out.reward_timeouts == 3
    assert out.rewards().dtype == torch.float32 and out.rewards().tolist() == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(RuntimeError, match=r"rollouts \[3\] were generated by no model-parallel rank"):
        merge([([_rollout(0), _rollout(1), _rollout(2)], 0)], 4)


def test_to_samples_pairs_each_rollout_with_its_problems_prompts():
    out = Rollouts([_rollout(k) for k in range(4)], 0)
    samples = to_samples(out, [[10], [11]], [[20], [21]], [0.5, -0.5, 1.0, -1.0])
    assert [(s.student_prompt, s.teacher_prompt, s.group) for s in samples] == [
        ([10], [20], 0),
        ([10], [20], 0),
        ([11], [21], 1),
        ([11], [21], 1),
    ]
    assert [s.advantage for s in samples] == [0.5, -0.5, 1.0, -1.0]
    assert samples[3].truncated and samples[3].response == [3, 4] and samples[2].reward == 0.5


# ---------------------------------------------------------------- on-policy pieces of the micro-batch loss
def test_ratio_weight_reads_the_behaviour_logprob():
    """PPO epochs > 1: rho (and so Ahat) comes from the old log-probs, not the current ones."""
    from egrsd_megatron.losses import token_advantages

    cfg = LossConfig(name="egrsd")
    samples, _, stats, _, old = _batch(0)
    mb = make_micro_batches(samples, 8)[0]
    _, rec = micro_batch_loss(stats, mb, cfg, denominator=mb.num_tokens, vocab_size=V, old_logprobs={0: old})
    _, want = token_advantages(
        mb.advantages,
        old,
        stats.teacher_logprob,
        stats.teacher_entropy,
        mb.mask,
        cfg,
        vocab_size=V,
        return_metrics=True,
    )
    _, current = token_advantages(
        mb.advantages,
        stats.student_logprob,
        stats.teacher_logprob,
        stats.teacher_entropy,
        mb.mask,
        cfg,
        vocab_size=V,
        return_metrics=True,
    )
    assert rec.values["ratio_weight_mean"] == want["ratio_weight_mean"] != current["ratio_weight_mean"]


def test_engine_mismatch_metrics():
    samples, _, stats, _, _ = _batch(1)
    delta = torch.linspace(0, 0.3, len(samples))
    for s, d in zip(samples, delta.tolist()):  # the engine's log-probs are the trainer's, shifted per row
        s.engine_logprobs = [float(x) + d for x in stats.student_logprob[samples.index(s), : len(s.response)]]
    mb = make_micro_batches(samples, 8)[0]
    _, rec = micro_batch_loss(stats, mb, LossConfig(name="grpo"), denominator=mb.num_tokens, vocab_size=V)
    per_token = delta[:, None].expand(mb.mask.shape)[mb.mask].double()
    # fp32 log-probs of magnitude <= 5 shifted by d: the difference is d to a few fp32 ulps of 5 (~1e-6).
    assert rec.values["logprob_diff_mean"] == pytest.approx(float(per_token.mean()), abs=2e-6)
    assert rec.values["logprob_diff_max"] == pytest.approx(0.3, abs=2e-6)
    assert rec.values["prob_ratio_error"] == pytest.approx(float(torch.expm1(per_token).mean()), abs=3e-6)
    bare = make_micro_batches([dataclasses.replace(s, engine_logprobs=[]) for s in samples], 8)[0]
    assert (
        "logprob_diff_mean"
        not in micro_batch_loss(stats, bare, LossConfig(name="grpo"), denominator=bare.num_tokens, vocab_size=V)[
            1
        ].values
    )
