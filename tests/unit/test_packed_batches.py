"""Packed micro-batches of the trainer (trainer/batch.py, issue 16), without a model.

- every sample lands in exactly one pack of one DP rank, student and teacher packs row-aligned, the
  response positions pointing at the token before each target, no padding (any PP size);
- the per-pass computed tokens and padding fraction metrics, by hand;
- the logged loss and metrics do not depend on the balancer's assignment (budgets, DP sizes), for every
  loss configuration of test_trainer_pieces.CONFIGS (the padded micro-batch-size test's twin);
- the config: the key's checks, the refused per-micro-batch gate quantile, micro_batch_size unused.
"""

from __future__ import annotations

import pytest
import torch

from egrsd_megatron.config import ConfigError, load_config
from egrsd_megatron.config.schema import LossConfig
from egrsd_megatron.data.balance import plan_micro_batches
from egrsd_megatron.losses import divergence_kind, group_advantages
from egrsd_megatron.ops.vocab_parallel import TokenStats
from egrsd_megatron.trainer.batch import (
    Sample,
    gather_positions,
    make_micro_batches,
    packed_micro_batches,
    pass_token_metrics,
    sequence_lengths,
)
from egrsd_megatron.trainer.metrics import KINDS, Record, reduce_metrics, rollout_record
from egrsd_megatron.trainer.passes import micro_batch_loss
from egrsd_megatron.trainer.rollouts import Rollout, Rollouts
from egrsd_megatron.trainer.update import local_denominator
from tests.unit.test_trainer_pieces import CONFIGS, EPS32, V, _batch, _logged

PLANS = [(16, 1), (24, 2), (64, 3), (200, 1)]  # (budget, DP size): other groupings of the same 8 samples


def _samples(n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sp = torch.randint(1, 50, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        tp = sp + torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(1, 50, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(Sample(sp, tp, resp, float(i), 0.0, False, i // 2, [-0.1 * (j + 1) for j in range(len(resp))]))
    return out


def test_packs_cover_every_sample_once_and_align_student_and_teacher():
    samples = _samples()
    seen = []
    for rank in range(2):
        bins = plan_micro_batches(sequence_lengths(samples), 2, 24)[rank]
        mbs = packed_micro_batches(samples, 24, rank, 2)
        for side in ("student", "teacher"):
            lengths = [getattr(mb, f"{side}_ids").shape[1] for mb in mbs]
            content = [sum(getattr(mb, f"{side}_pack").lengths) for mb in mbs]
            # each pack its own content, no padding (at PP > 1 too: variable_seq_lengths)
            assert lengths == content and len(set(lengths)) > 1, (side, lengths, content)
            assert max(lengths) <= 24
        assert len(mbs) == len(bins) and [mb.index for mb in mbs] == list(range(len(mbs)))
        for mb, b in zip(mbs, bins):
            seen += b
            assert mb.packed and mb.student_ids.shape[0] == mb.teacher_ids.shape[0] == 1
            assert mb.advantages.tolist() == [samples[i].advantage for i in b]
            assert torch.equal(mb.teacher_pack.targets, mb.targets) and torch.equal(mb.teacher_pack.mask, mb.mask)
            for side in ("student", "teacher"):
                ids, pos = getattr(mb, f"{side}_ids")[0], getattr(mb, f"{side}_resp_pos")
                # the logits at pos score token pos + 1: the response token itself
                assert torch.equal(ids[pos + 1][mb.mask], mb.targets[mb.mask])
                assert mb.computed_tokens(side) == ids.numel()
            for r, i in enumerate(b):
                n = len(samples[i].response)
                assert mb.targets[r, :n].tolist() == samples[i].response and int(mb.mask[r].sum()) == n
                assert mb.engine_logprobs[r, :n].tolist() == pytest.approx(samples[i].engine_logprobs)
            assert torch.equal(mb.segment_ids, torch.arange(len(b)).unsqueeze(1).expand_as(mb.mask))
    assert sorted(seen) == list(range(len(samples)))


def test_pass_token_metrics_count_padding_per_pass():
    """computed_tokens_<side> and padding_frac_<side> by hand, padded and packed, and their reduction over
    micro-batches and ranks: 1 - real / computed of the whole step, whatever the split."""
    mk = [Sample([1, 2], [1, 2, 3, 4], [5] * n, 0.0, 0.0, False, 0) for n in (1, 3, 6)]
    # padded to the batch's longest: student 2 + 6 = 8, teacher 4 + 6 = 10 positions per row
    mbs = make_micro_batches(mk, 3)
    got = pass_token_metrics(mbs[0], teacher=True)
    assert got["computed_tokens_student"] == 24 and got["computed_tokens_teacher"] == 30
    # real: student 3 + 5 + 8 = 16 of 24, teacher 5 + 7 + 10 = 22 of 30
    assert got["padding_frac_student"] == pytest.approx(8 / 24, abs=1e-15)
    assert got["padding_frac_teacher"] == pytest.approx(8 / 30, abs=1e-15)
    assert set(pass_token_metrics(mbs[0], teacher=False)) == {"computed_tokens_student", "padding_frac_student"}
    # two padded micro-batches of 1 and 2 rows: per record its own fraction, reduced to the step's one
    split = [pass_token_metrics(mb, teacher=True) for mb in make_micro_batches(mk, 1)]
    red = reduce_metrics([[Record(v) for v in split]])
    assert red["computed_tokens_student"] == 24 and red["padding_frac_student"] == pytest.approx(8 / 24, abs=1e-15)
    # packed: each pack its own content, no padding
    packed = [pass_token_metrics(mb, teacher=True) for mb in packed_micro_batches(mk, 12)]
    red = reduce_metrics([[Record(v) for v in packed]])
    assert red["computed_tokens_student"] == 16 and red["computed_tokens_teacher"] == 22
    assert red["padding_frac_student"] == 0.0 and red["padding_frac_teacher"] == 0.0


def test_gather_positions_of_a_pack_and_of_padded_rows():
    logits = torch.randn(1, 7, 5)
    pos = torch.tensor([[0, 2, 0], [3, 4, 6]])
    got = gather_positions(logits, pos)
    assert got.shape == (2, 3, 5) and torch.equal(got[1, 2], logits[0, 6]) and torch.equal(got[0, 1], logits[0, 2])
    padded = torch.randn(2, 7, 5)  # b > 1: row r's positions index row r
    assert torch.equal(gather_positions(padded, pos)[1, 0], padded[1, 3])


def test_student_only_plan_and_a_missing_teacher_pack():
    samples = _samples()
    student = [len(s.student_prompt) + len(s.response) for s in samples]
    assert sequence_lengths(samples, teacher=False) == student
    assert sequence_lengths(samples) == [len(s.teacher_prompt) + len(s.response) for s in samples]
    mbs = packed_micro_batches(samples, 13, teacher=False)  # below the longest teacher sequence: fine here
    assert all(mb.teacher_pack is None and mb.teacher_ids.numel() == 0 for mb in mbs)


def test_a_sequence_over_the_budget_names_the_key():
    samples = _samples()
    longest = max(sequence_lengths(samples))
    with pytest.raises(ConfigError, match="parallel.max_tokens_per_micro_batch.*budget"):
        packed_micro_batches(samples, longest - 1)


def _packed_logged(cfg: LossConfig, samples, rewards, stats: TokenStats, ref, old, budget: int, dp: int):
    """_logged's twin over packed micro-batches: the per-sample rows of `stats` placed by the plan."""
    denominator = local_denominator(samples, cfg.aggregation)
    ranks, loss = [], 0.0
    for rank in range(dp):
        records = []
        bins = plan_micro_batches(sequence_lengths(samples), dp, budget)[rank]
        for mb, b in zip(packed_micro_batches(samples, budget, rank, dp), bins):

            def rows(t, b=b, r=mb.mask.shape[1]):
                return t[b][:, :r]

            part = TokenStats(
                rows(stats.student_logprob),
                rows(stats.teacher_logprob),
                rows(stats.teacher_entropy),
                None,
                rows(stats.kl) if divergence_kind(cfg) else None,
            )
            lo, rec = micro_batch_loss(
                part,
                mb,
                cfg,
                denominator=denominator,
                vocab_size=V,
                ref_logprobs={mb.index: rows(ref)},
                old_logprobs={mb.index: rows(old)},
            )
            records.append(rec)
            loss += float(lo)
        ranks.append(records)
    _, stats_adv = group_advantages(rewards, 4, return_metrics=True)
    out = Rollouts([Rollout(k, s.group, s.response, "", s.truncated, s.reward) for k, s in enumerate(samples)], 0)
    ranks[0].append(rollout_record(out, stats_adv["zero_adv_group_frac"]))
    return reduce_metrics(ranks), loss


@pytest.mark.parametrize(
    "kw", CONFIGS, ids=lambda kw: "-".join(str(getattr(v, "kind", getattr(v, "signal", v))) for v in kw.values())
)
def test_the_assignment_does_not_change_logged_values(kw):
    cfg = LossConfig(**kw)
    samples, rewards, stats, ref, old = _batch(0)
    whole, loss_whole = _logged(cfg, samples, rewards, stats, ref, old, 8)  # one padded micro-batch: the definition
    n = sum(len(s.response) for s in samples)
    tol = n * EPS32 * 5.0  # test_trainer_pieces' bound: regrouping the same N terms of magnitude <= 5
    groupings = set()
    for budget, dp in PLANS:
        got, loss = _packed_logged(cfg, samples, rewards, stats, ref, old, budget, dp)
        groupings.add(str(plan_micro_batches(sequence_lengths(samples), dp, budget)))
        assert set(got) == set(whole), (budget, dp)
        for k in got:
            if KINDS[k].how in ("sum", "max", "quantile") and k != "loss":
                assert got[k] == whole[k], (k, budget, dp)
            else:
                assert got[k] == pytest.approx(whole[k], abs=tol, rel=0), (k, budget, dp)
        assert loss == pytest.approx(loss_whole, abs=tol, rel=0) and abs(loss) > 1e-3
    assert len(groupings) == len(PLANS)  # really other assignments


def test_padded_path_is_unchanged_by_the_key():
    samples, *_ = _batch(0)
    assert not make_micro_batches(samples, 4)[0].packed and make_micro_batches(samples, 4)[0].segment_ids is None


def test_config_key_checks(tmp_path):
    from egrsd_megatron.models import resolve_arch
    from egrsd_megatron.models.layout import check_parallel_layout

    assert not load_config(None, []).parallel.packing
    assert not load_config(None, ["parallel.max_tokens_per_micro_batch=0"]).parallel.packing
    assert load_config(None, ["parallel.max_tokens_per_micro_batch=4096"]).parallel.packing
    with pytest.raises(ConfigError, match="parallel.max_tokens_per_micro_batch"):
        load_config(None, ["parallel.max_tokens_per_micro_batch=-1"])
    gate = ["loss.name=egrsd", "loss.gate.kind=linear", "loss.gate.h_ref=quantile:0.9"]
    load_config(None, gate)  # padded: allowed (a micro-batch quantile, as documented)
    with pytest.raises(ConfigError, match="parallel.max_tokens_per_micro_batch.*quantile"):
        load_config(None, gate + ["parallel.max_tokens_per_micro_batch=4096"])
    # micro_batch_size does not divide the 2 x 4 rollouts per rank: refused padded, unused (fine) packed
    odd = ["parallel.micro_batch_size=3", "train.prompts_per_step=2", "rollout.group_size=4"]
    cfg = load_config(None, odd)
    with pytest.raises(ConfigError, match="parallel.micro_batch_size=3"):
        check_parallel_layout(cfg, resolve_arch(cfg.model), 1)
    cfg = load_config(None, odd + ["parallel.max_tokens_per_micro_batch=4096"])
    check_parallel_layout(cfg, resolve_arch(cfg.model), 1)
