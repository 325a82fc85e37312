"""token_stats at TP = 2 and 4 (spawned gloo ranks) against float64 full-vocabulary math in the parent.

One spawn per world size runs every case and returns each rank's statistics and gradient slice, the
number of collectives per forward / backward, and the errors raised for bad input (every rank must raise
the same error, rather than one rank raising while the others hang in a collective).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from egrsd_megatron.testing.spawn import run_distributed
from tests.unit.test_vocab_parallel import (
    KL_MODES,
    ONE_MODES,
    RTOL_BF16_GRAD,
    RTOL_FP32,
    TEMPERATURES,
    assert_matches,
    assert_one_within_derived,
    assert_within_derived,
    make_case,
    reference_stats,
    run_token_stats,
    run_token_stats_one,
)

# name -> (seed, n, v_total, vocab_size, dtype, kl, chunk_size, rows per work block)
CASES = {f"fp32-{kl}": (0, 45, 64, 57, "float32", kl, 16, 5) for kl in KL_MODES}
CASES.update(
    {
        "bf16-reverse": (1, 33, 64, 64, "bfloat16", "reverse", 7, 64),
        "bf16-jsd": (1, 33, 64, 64, "bfloat16", ("jsd", 0.7), 7, 3),
        # vocab 12 of 64 columns: at TP=2 rank 1, at TP=4 ranks 1-3 hold padding only.
        "tiny-vocab-forward": (9, 20, 64, 12, "float32", "forward", 6, 4),
    }
)
# Sampling temperature (fp32 case 0, vocab 57 of 64): name -> (kl, temperature, entropy_temperature).
TEMP_CASES = {f"T{t}-{kl}": (kl, t, None) for t in TEMPERATURES for kl in KL_MODES}
TEMP_CASES.update({f"T{t}-H1-{kl}": (kl, t, 1.0) for t in TEMPERATURES for kl in (None, ("jsd", 0.3))})
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
)


def _case(name: str):
    seed, n, v, vocab, dtype, kl, chunk, rows = CASES[name]
    return make_case(seed, n, v, vocab, getattr(torch, dtype)), kl, chunk, rows


def _slice(c: dict, rank: int, world: int):
    vl = c["zs"].shape[1] // world
    cols = slice(rank * vl, (rank + 1) * vl)
    return c["zs"][:, cols].contiguous(), c["zt"][:, cols].contiguous(), vl


def _count_collectives(fn):
    """Run fn() with every torch.distributed collective counted; return (fn's result, {name: count})."""
    import torch.distributed as dist

    counts: dict = {}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, orig):
        def counted(*a, **k):
            key = name if name != "all_reduce" else f"all_reduce.{str(k.get('op', 'SUM')).split('.')[-1]}"
            counts[key] = counts.get(key, 0) + 1
            return orig(*a, **k)

        return counted

    for name, orig in originals.items():
        setattr(dist, name, wrap(name, orig))
    try:
        return fn(), counts
    finally:
        for name, orig in originals.items():
            setattr(dist, name, orig)


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from egrsd_megatron.ops.vocab_parallel import NonFiniteLogitsError, token_stats

    group = dist.group.WORLD
    out: dict = {"cases": {}, "counts": {}, "errors": {}}
    for name in CASES:
        c, kl, chunk, rows = _case(name)
        zs, zt, vl = _slice(c, rank, world)
        out["cases"][name] = run_token_stats(
            zs, zt, c["y"], c["w"], kl, group=group, vocab_size=c["vocab_size"], chunk_size=chunk, block_elems=rows * vl
        )
    out["temp"] = {}
    c, _, _, _ = _case("fp32-None")
    zs, zt, vl = _slice(c, rank, world)
    for name, (kl, t, t_h) in TEMP_CASES.items():
        out["temp"][name] = run_token_stats(
            zs,
            zt,
            c["y"],
            c["w"],
            kl,
            group=group,
            vocab_size=57,
            chunk_size=16,
            block_elems=5 * vl,
            temperature=t,
            entropy_temperature=t_h,
        )
    # Collectives per forward and backward (45 tokens, chunk 16: 3 chunks).
    c, _, _, _ = _case("fp32-None")
    zs, zt, vl = _slice(c, rank, world)
    for kl in KL_MODES:
        x = zs.clone().requires_grad_(True)
        st, fwd = _count_collectives(
            lambda x=x, kl=kl: token_stats(
                x, zt, c["y"], group=group, vocab_size=57, chunk_size=16, student_entropy=True, kl=kl
            )
        )
        loss = st.student_logprob.sum() + st.student_entropy.sum() + (st.kl.sum() if kl else 0)
        _, bwd = _count_collectives(loss.backward)
        out["counts"][str(kl)] = (fwd, bwd)
    # The one-distribution mode (token_stats_one): values, gradient slices and its own collective count.
    from egrsd_megatron.ops.vocab_parallel import token_stats_one

    out["one"], out["one_counts"] = {}, {}
    for t, t_h in ONE_MODES:
        out["one"][str((t, t_h))] = run_token_stats_one(
            zs,
            c["y"],
            c["w"],
            group=group,
            vocab_size=57,
            chunk_size=16,
            block_elems=5 * vl,
            temperature=t,
            entropy_temperature=t_h,
        )
    for ent in (False, True):
        x = zs.clone().requires_grad_(True)
        st, fwd = _count_collectives(
            lambda x=x, ent=ent: token_stats_one(x, c["y"], group=group, vocab_size=57, chunk_size=16, entropy=ent)
        )
        _, bwd = _count_collectives(st.logprob.sum().backward)
        out["one_counts"][ent] = (fwd, bwd)
    # A subgroup as the TP group (TP=2 inside the world): ranks use their rank in the group.
    if world == 4:
        subs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sub = subs[rank // 2]
        c, kl, chunk, rows = _case("fp32-reverse")
        zs, zt, vl = _slice(c, rank % 2, 2)
        out["subgroup"] = run_token_stats(zs, zt, c["y"], c["w"], kl, group=sub, vocab_size=57, chunk_size=chunk)
    # Bad input: each case must raise on every rank (no rank may be left waiting in a collective).
    c, _, _, _ = _case("fp32-None")
    zs, zt, vl = _slice(c, rank, world)
    bad_s = zs.clone()
    if rank == world - 1:
        bad_s[7, 2] = math.nan  # only the last rank sees it
        bad_s[40, 0] = math.inf
    z_all = zs.clone()
    z_all[3, :] = -math.inf
    trials = {
        "nan_on_one_rank": lambda: token_stats(bad_s, zt, c["y"], group=group, vocab_size=57, chunk_size=16),
        "all_minus_inf": lambda: token_stats(z_all, zt, c["y"], group=group, vocab_size=57),
        "vocab_too_big": lambda: token_stats(zs, zt, c["y"], group=group, vocab_size=vl * world + 1),
    }
    for name, trial in trials.items():
        try:
            trial()
            out["errors"][name] = None
        except (NonFiniteLogitsError, ValueError) as e:
            out["errors"][name] = f"{type(e).__name__}: {e}"
    st = token_stats(bad_s, zt, c["y"], group=group, vocab_size=57, check_finite=False)
    out["unchecked_finite_rows"] = torch.isfinite(st.student_logprob).numpy()
    dist.barrier()
    return out


def _check_world(world: int) -> None:
    results = run_distributed(_worker, world, timeout=240)
    for name in CASES:
        c, kl, _, _ = _case(name)
        ref = reference_stats(c["zs"], c["zt"], c["y"], c["w"], c["vocab_size"], kl)
        for rank, res in enumerate(results):
            ours = dict(res["cases"][name])
            ours["grad"] = np.concatenate([r["cases"][name]["grad"] for r in results], axis=1)
            grad_rtol = RTOL_BF16_GRAD if "bf16" in name else RTOL_FP32
            assert_matches(ours, ref, RTOL_FP32, grad_rtol, f"TP={world} rank {rank} {name}")
            assert np.all(ours["grad"][:, c["vocab_size"] :] == 0.0)
    c, _, _, _ = _case("fp32-None")
    for name, (kl, t, t_h) in TEMP_CASES.items():
        ref = reference_stats(c["zs"], c["zt"], c["y"], c["w"], 57, kl, temperature=t, entropy_temperature=t_h)
        for rank, res in enumerate(results):
            ours = dict(res["temp"][name])
            ours["grad"] = np.concatenate([r["temp"][name]["grad"] for r in results], axis=1)
            assert_within_derived(ours, ref, c["w"], 57, t, f"TP={world} rank {rank} {name}")
            assert np.all(ours["grad"][:, 57:] == 0.0)
    chunks = math.ceil(45 / 16)
    for kl in KL_MODES:
        for rank, res in enumerate(results):
            fwd, bwd = res["counts"][str(kl)]
            want = {"all_reduce.MAX": chunks, "all_reduce.SUM": chunks * (2 if kl and kl[0] == "jsd" else 1)}
            assert fwd == want, f"TP={world} rank {rank} kl={kl}: forward collectives {fwd}, want {want}"
            assert bwd == {}, f"TP={world} rank {rank} kl={kl}: backward ran collectives {bwd}"
    c, _, _, _ = _case("fp32-None")
    for t, t_h in ONE_MODES:
        for rank, res in enumerate(results):
            ours = dict(res["one"][str((t, t_h))])
            ours["grad"] = np.concatenate([r["one"][str((t, t_h))]["grad"] for r in results], axis=1)
            assert_one_within_derived(
                ours, c["zs"], c["y"], c["w"], 57, t, t_h, f"TP={world} rank {rank} one {t} {t_h}"
            )
    for rank, res in enumerate(results):
        for ent, (fwd, bwd) in res["one_counts"].items():
            want = {"all_reduce.MAX": chunks, "all_reduce.SUM": chunks}
            assert fwd == want and bwd == {}, f"TP={world} rank {rank} one entropy={ent}: {fwd}, {bwd}, want {want}"
    if world == 4:
        c, kl, _, _ = _case("fp32-reverse")
        ref = reference_stats(c["zs"], c["zt"], c["y"], c["w"], 57, kl)
        for pair in ((0, 1), (2, 3)):
            ours = dict(results[pair[0]]["subgroup"])
            ours["grad"] = np.concatenate([results[r]["subgroup"]["grad"] for r in pair], axis=1)
            assert_matches(ours, ref, RTOL_FP32, RTOL_FP32, f"TP=2 subgroup {pair}")
    for rank, res in enumerate(results):
        err = res["errors"]
        assert (
            err["nan_on_one_rank"]
            and "student_logits" in err["nan_on_one_rank"]
            and "token index 7 " in err["nan_on_one_rank"]
        ), (rank, err)
        assert err["all_minus_inf"] and "every logit of token index 3 " in err["all_minus_inf"], (rank, err)
        assert err["vocab_too_big"] and "covering 64 ids" in err["vocab_too_big"], (rank, err)
        finite = res["unchecked_finite_rows"]
        assert not finite[7] and not finite[40] and finite[:7].all(), (rank, finite)


def test_token_stats_tp2() -> None:
    _check_world(2)


@pytest.mark.slow
def test_token_stats_tp4() -> None:
    _check_world(4)
