"""parallel.distributed_optimizer=true (ZeRO-1: AdamW states sharded over the data-parallel group).

- same per-step losses, lr and final weights as the non-sharded optimizer, bitwise, at DP=2 x TP=2; each
  DP rank keeps only its share of the Adam states;
- stop after step 2 (as a preemption does) and resume to step 4 == 4 uninterrupted steps, bitwise;
- a checkpoint resumes with the other optimizer kind (bitwise) and at another DP size; a checkpoint that
  lost a shard file is refused with a message naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from egrsd_megatron.checkpoint.manifest import write_manifest
from egrsd_megatron.checkpoint.train_state import DamagedCheckpointError
from egrsd_megatron.config import load_config
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.tiny import save_tiny_hf_model
from egrsd_megatron.testing.tolerance import FP32_U, adam_update_change, fp32_sum_tol
from tests.distributed.test_trainer import tiny_overrides, write_data

# A schedule that moves every step (warmup then cosine) and a clip below the tiny model's grad norm (both
# asserted in _check_equivalence), so the scheduler and the clipping act through the sharded optimizer.
# optim.eps=1e-4 bounds how much Adam amplifies a gradient difference (|d update| <= ~lr |dg| / eps): the
# DP-change comparison after an optimizer step (test_zero1_checkpoints_...) derives its bound from it.
OPTIM = {
    "optim.warmup_steps": 1,
    "optim.min_lr": 1e-4,
    "optim.clip_grad": 0.1,
    "optim.weight_decay": 0.01,
    "optim.lr": 1e-3,
    "optim.eps": 1e-4,
}


def _data(tmp_path) -> str:
    """The prompts, and the tiny HF model next to them, made once before the ranks start (each rank's
    tiny_overrides would otherwise race to write it)."""
    data = write_data(str(tmp_path / "train.jsonl"))
    save_tiny_hf_model(str(tmp_path / "tiny_hf"))
    return data


def _overrides(data, out, zero, **extra):
    return tiny_overrides(
        data,
        out,
        **{
            "loss.name": "cl_egrsd",
            "train.steps": 4,
            "train.keep_last": 5,
            "parallel.distributed_optimizer": str(zero).lower(),
            **OPTIM,
            **extra,
        },
    )


def run_trainer(trainer, stop_after=None):
    """Run `trainer`; with `stop_after`, ask for preemption after that many steps (it saves and returns 42)."""
    if stop_after is not None:
        step = trainer.train_step

        def step_then_stop():
            metrics = step()
            if trainer.step + 1 == stop_after:
                trainer.preempt.signum = signal.SIGUSR1
            return metrics

        trainer.train_step = step_then_stop
    code = trainer.run()
    assert code == (0 if stop_after is None else 42), code
    return trainer


def _run(overrides, stop_after=None):
    from egrsd_megatron.trainer.loop import Trainer

    return run_trainer(Trainer(load_config(None, overrides)), stop_after)


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _adam_elements(state):
    return sum(t.numel() for st in state.values() for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))


def equivalence(rank, world, tp, data, out):
    """Both optimizer kinds; per rank: final weights, and for ZeRO the owned parameters and state sizes."""
    from egrsd_megatron.checkpoint.optimizer_state import is_sharded, owned_indices

    res = {}
    for zero in (False, True):
        run_dir = os.path.join(out, f"tp{tp}_zero{int(zero)}")
        t = _run(_overrides(data, run_dir, zero, **{"parallel.tp": tp}))
        assert is_sharded(t.optimizer) == zero
        r = {"weights": _weights(t), "rows": _rows(run_dir) if rank == 0 else None}
        if zero:
            params = [p for g in t.optimizer.param_groups for p in g["params"]]
            r["owned"] = sorted(owned_indices(t.optimizer))
            r["local_elements"] = _adam_elements(t.optimizer.optim.state)
            r["all_elements"] = 2 * sum(p.numel() for p in params)
            r["largest_param"] = max(p.numel() for p in params)
            r["n_params"] = len(params)
            r["lrs"] = ([g["lr"] for g in t.optimizer.param_groups], [g["lr"] for g in t.optimizer.optim.param_groups])
        else:
            r["all_elements_adamw"] = _adam_elements(t.optimizer.state)
        res[zero] = r
    return res


def _check_equivalence(results, dp):
    # Bitwise throughout: both optimizer kinds run at the same layout in the same processes (same thread
    # count), reduce the same gradients in the same order, and apply the same element-wise AdamW update
    # (ZeRO only changes which rank computes it and broadcasts the bits).
    rows0, rows1 = results[0][False]["rows"], results[0][True]["rows"]
    assert [r["step"] for r in rows1] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "lr", "accuracy"):
        assert [r[key] for r in rows1] == [r[key] for r in rows0], key  # bitwise (JSON floats round-trip)
    assert any(r["grad_norm"] > OPTIM["optim.clip_grad"] for r in rows0)  # clipping was active
    assert len({r["lr"] for r in rows0}) == 4  # the schedule moved every step
    for res in results:
        for name, w in res[False]["weights"].items():
            assert np.array_equal(w, res[True]["weights"][name]), name
    # Sharding: within each DP group the owned parameters are disjoint and cover all; each rank holds
    # about 1/DP of the Adam state elements (torch assigns whole parameters greedily by size, so a rank
    # is off the even share by at most the largest parameter, x2 for exp_avg and exp_avg_sq).
    tp = len(results) // dp
    for tp_rank in range(tp):
        group = [results[d * tp + tp_rank][True] for d in range(dp)]  # Megatron: DP ranks stride TP
        owned = [set(g["owned"]) for g in group]
        assert sum(len(o) for o in owned) == len(set().union(*owned)) == group[0]["n_params"]
        total = group[0]["all_elements"]
        assert sum(g["local_elements"] for g in group) == total == results[tp_rank][False]["all_elements_adamw"]
        for g in group:
            assert abs(g["local_elements"] - total / dp) <= 2 * g["largest_param"], (g["local_elements"], total)
            assert g["local_elements"] < total
            # LambdaLR writes the wrapper's param_groups; ZeRO copies them to the local AdamW at each step.
            # The logged lr is the one set for the next step: the local AdamW's last step used step 3's.
            assert g["lrs"][0] == [rows1[-1]["lr"]] * 2 and g["lrs"][1] == [rows1[-2]["lr"]] * 2, g["lrs"]
    return [(g["local_elements"], g["all_elements"]) for r in results for g in [r[True]]]


# DP=2 x TP=2 covers DP=2 at TP=1 too (each TP shard's DP group is checked separately); a separate DP=2,
# TP=1 run (42 s here) was dropped to keep the suite's time.
@pytest.mark.slow
def test_zero1_matches_adamw_dp2_tp2(tmp_path):
    data = _data(tmp_path)
    results = run_distributed(equivalence, 4, 2, data, str(tmp_path), timeout=1200)
    print("ZeRO-1 Adam elements per rank (local, total):", _check_equivalence(results, dp=2))


# ------------------------------------------------------------------ checkpoint / resume
def _ckpt(out, step):
    return os.path.join(out, "checkpoints", f"step_{step:08d}")


def resume_runs(rank, world, data, out):
    """A: 4 steps (checkpoints at 2 and 4), ZeRO. B: ZeRO, stopped after step 2, resumed to 4.
    C: AdamW from A's step-2 checkpoint to 4. D: AdamW 4 steps; E: ZeRO from D's step-2 checkpoint."""
    res = {}
    a, b, c, d, e = (os.path.join(out, x) for x in "abcde")
    res["a"] = _weights(_run(_overrides(data, a, True, **{"train.save_every": 2})))
    _run(_overrides(data, b, True, **{"train.save_every": 0}), stop_after=2)
    res["b"] = _weights(_run(_overrides(data, b, True, **{"train.resume": "auto"})))
    res["c"] = _weights(_run(_overrides(data, c, False, **{"train.resume": _ckpt(a, 2)})))
    res["d"] = _weights(_run(_overrides(data, d, False, **{"train.save_every": 2})))
    res["e"] = _weights(_run(_overrides(data, e, True, **{"train.resume": _ckpt(d, 2)})))
    if rank == 0:
        res["rows"] = {x: _rows(os.path.join(out, x)) for x in "abcde"}
        res["files"] = sorted(os.listdir(os.path.join(_ckpt(a, 2), "optim")))
    return res


def dp_change(rank, world, data, src, out):
    """Resume the DP=2 ZeRO checkpoint at DP=1 (ZeRO and AdamW); then a copy missing a shard file."""
    res = {}
    for zero in (True, False):
        run_dir = os.path.join(out, f"dp1_zero{int(zero)}")
        res[f"w{int(zero)}"] = _weights(_run(_overrides(data, run_dir, zero, **{"train.resume": src})))
        res[zero] = _rows(run_dir)
    broken = os.path.join(out, "broken", os.path.basename(src))
    shutil.copytree(src, broken)
    os.remove(os.path.join(broken, "optim", "mp_rank_00_dp_001.pt"))
    try:
        _run(_overrides(data, os.path.join(out, "broken_run"), True, **{"train.resume": broken}))
    except DamagedCheckpointError as err:  # the manifest check, before any optimizer file is read
        res["error"] = str(err)
    # The same folder with its manifest rewritten to match (a shard lost before the save finished, in a
    # folder someone re-manifested by hand): the shard loader's own check names what is missing.
    write_manifest(broken)
    try:
        _run(_overrides(data, os.path.join(out, "broken_run2"), True, **{"train.resume": broken}))
    except FileNotFoundError as err:
        res["shard_error"] = str(err)
    return res


def _dp_change_tolerances(ref_rows) -> dict:
    """Bounds on |DP=1 - DP=2| for steps 3 and 4 resumed from the same DP=2 checkpoint.

    Setup (run_distributed's env pins 1 thread per rank on both sides): step 3 starts from the same bits
    (weights, Adam states), the same rollouts (per-rollout seeds) and the same micro-batches (4 rollouts,
    = the per-rank batch at DP=2), so every per-micro-batch forward/backward runs the same kernels on the
    same shapes at the same thread count: the same bits. DP only changes how the 2 halves are combined:
    - gradient: (a + b) / 2 from an all-reduce vs micro-batch accumulation: <= 2 roundings per element
      per side, |dg| <= rel |g| with rel = 4 u (worst case);
    - accuracy: a mean of 8 rewards in [0, 1] (DP=2: of two per-rank means): fp32_sum_tol(8, 1);
    - loss: the aggregation over <= 8 x 8 response tokens, micro-batches and ranks (n <= 128 terms) of
      per-token terms |Ahat * ratio| <= |A| (1 + eps_w) <= 1.8 (on-policy ratio = 1; group-normalised
      |A| <= (G-1)/sqrt(G) = 1.5 at G = 4; gate <= 1): fp32_sum_tol(128, 2);
    - grad_norm: the gradient's relative error plus the norm's own: 2 rel grad_norm.
    Step 4 follows one AdamW step on gradients clipped to 0.1 (both sides scaled alike; the norm's error
    doubles the relative one): |dg_clipped| <= 2 rel clip. Adam's update lr m_hat / (sqrt(v_hat) + eps)
    changes by <= c lr |dg| / eps with c ~= 1 at t = 3 for betas (0.9, 0.999) (take c = 2), so
    ||dw||_2 <= 2 lr (2 rel clip) / eps ~= 9.5e-7 (the reason for OPTIM's eps = 1e-4: at eps = 1e-8 the
    same bound is 1e4 times larger, and near-zero gradient components take lr-sized steps of random sign).
    Then |d loss_4| <= step 3's + grad_norm_4 ||dw||, and |d grad_norm_4| <= step 3's + lambda_max ||dw||
    with lambda_max < 2 / lr (assumed: the curvature below which a gradient step of size lr is stable;
    an assumption for Adam, and the loosest bound here: 1.9e-3 absolute). Final weights: both
    steps' ||dw|| plus the rounding of each update into weights of |w| <= 1: 2 (||dw|| + 2 u).
    """
    rel = 4 * FP32_U
    clip, lr, eps = OPTIM["optim.clip_grad"], OPTIM["optim.lr"], OPTIM["optim.eps"]
    dw = adam_update_change(lr, eps, 2 * rel * clip)
    loss3 = fp32_sum_tol(128, 2.0)
    gn = [r["grad_norm"] for r in ref_rows]
    return {
        "accuracy": [fp32_sum_tol(8, 1.0)] * 2,
        "loss": [loss3, loss3 + gn[1] * dw],
        "grad_norm": [2 * rel * gn[0], 2 * rel * gn[1] + 2 / lr * dw],
        "weights": 2 * (dw + 2 * FP32_U),
    }


@pytest.mark.slow
def test_zero1_checkpoints_resume_bitwise_and_across_kinds_and_dp(tmp_path):
    data = _data(tmp_path)
    one_thread = {"OMP_NUM_THREADS": "1"}  # the DP-change comparison below needs equal thread counts
    results = run_distributed(resume_runs, 2, data, str(tmp_path), timeout=1200, env=one_thread)
    rows = results[0]["rows"]
    assert results[0]["files"] == ["mp_rank_00.pt", "mp_rank_00_dp_000.pt", "mp_rank_00_dp_001.pt"]
    assert [r["step"] for r in rows["b"]] == [r["step"] for r in rows["a"]] == [1, 2, 3, 4]
    assert [r["step"] for r in rows["c"]] == [r["step"] for r in rows["e"]] == [3, 4]
    # Bitwise: a resume continues at the same layout and thread count from the saved bits (weights, Adam
    # states, RNG), so every later operation repeats the uninterrupted run's.
    for x, ref in (("b", "a"), ("c", "a"), ("e", "d")):
        n = len(rows[x])
        for key in ("loss", "grad_norm", "lr"):
            assert [r[key] for r in rows[x]] == [r[key] for r in rows[ref][-n:]], (x, key)
        for res in results:
            for name, w in res[ref].items():
                assert np.array_equal(w, res[x][name]), (x, name)
    # And both kinds take the same trajectory, so all five runs end at the same weights.
    for res in results:
        for name, w in res["a"].items():
            assert np.array_equal(w, res["d"][name]), name

    # A's DP=2 ZeRO checkpoint resumed at DP=1, with and without ZeRO; then a copy missing a shard file.
    ref = rows["a"]
    res = run_distributed(
        dp_change, 1, data, _ckpt(str(tmp_path / "a"), 2), str(tmp_path / "dp1"), timeout=900, env=one_thread
    )[0]
    for zero in (True, False):
        rows = res[zero]
        assert [r["step"] for r in rows] == [3, 4]
        assert [r["lr"] for r in rows] == [r["lr"] for r in ref[2:]]
        tol = _dp_change_tolerances(ref[2:])
        got = {k: [r[k] for r in rows] for k in ("accuracy", "loss", "grad_norm")}
        want = {k: [r[k] for r in ref[2:]] for k in ("accuracy", "loss", "grad_norm")}
        wdiff = max(float(np.abs(w - res[f"w{int(zero)}"][n]).max()) for n, w in results[0]["a"].items())
        print(
            f"DP=2 -> DP=1 (distributed_optimizer={zero}): |diff| / tolerance:",
            {k: [f"{abs(a - b):.2g} / {t:.2g}" for a, b, t in zip(got[k], want[k], tol[k])] for k in got},
            f"weights {wdiff:.2g} / {tol['weights']:.2g}",
        )
        for k in got:  # per-step tolerances (numpy's assert_allclose takes one scalar atol in its message)
            assert all(abs(a - b) <= t for a, b, t in zip(got[k], want[k], tol[k])), (k, got[k], want[k], tol[k])
        assert wdiff <= tol["weights"], (wdiff, tol["weights"])
    assert "optim/mp_rank_00_dp_001.pt" in res["error"] and "missing" in res["error"], res["error"]
    err = res["shard_error"]
    assert "mp_rank_00_dp_001.pt is missing" in err and "data-parallel size 2" in err, err


# ------------------------------------------------------------------ bf16 parameters: fp32 master weights
def bf16_runs(rank, world, data, out):
    """bf16 parameters (the cluster configs), one rank: A MasterWeightAdamW, 3 steps, checkpoint at 2;
    B resumed from A's step-2 checkpoint; then ZeRO-1, which this CPU model (fp32 torch norms) refuses."""
    import torch

    from egrsd_megatron.config import ConfigError
    from egrsd_megatron.trainer.optim import MasterWeightAdamW

    bf16 = {"model.params_dtype": "bf16", "model.precision": "bf16", "loss.name": "opsd", "train.steps": 3}
    a, b = os.path.join(out, "a"), os.path.join(out, "b")
    ta = _run(_overrides(data, a, False, **bf16, **{"train.save_every": 2}))
    assert type(ta.optimizer) is MasterWeightAdamW
    masters = {n: ta.optimizer.state[p]["master"].clone() for n, p in ta.model.named_parameters()}
    res = {"a": _weights(ta), "b": _weights(_run(_overrides(data, b, False, **bf16, **{"train.resume": _ckpt(a, 2)})))}
    res["dtypes"] = {str(w.dtype) for w in res["a"].values()}
    # The parameters are the fp32 masters rounded, and the masters moved off the bf16 grid.
    res["rounded"] = all(torch.equal(res["a"][n], m.to(res["a"][n].dtype)) for n, m in masters.items())
    res["off_grid"] = sum(int((m != m.to(torch.bfloat16).float()).sum()) for m in masters.values())
    res["a"], res["b"] = ({n: w.float() for n, w in res[x].items()} for x in ("a", "b"))  # numpy has no bf16
    ckpt = torch.load(os.path.join(_ckpt(a, 2), "optim", "mp_rank_00.pt"), weights_only=True)["optimizer"]
    res["saved_master_dtypes"] = {str(st["master"].dtype) for st in ckpt["state"].values()}
    try:
        _run(_overrides(data, os.path.join(out, "zero"), True, **bf16))
    except ConfigError as err:
        res["zero_error"] = str(err)
    return res


@pytest.mark.slow
def test_bf16_params_keep_fp32_masters_and_resume_bitwise(tmp_path):
    data = _data(tmp_path)
    for res in run_distributed(bf16_runs, 1, data, str(tmp_path), timeout=900):
        assert "torch.bfloat16" in res["dtypes"] and res["rounded"] and res["off_grid"] > 0
        assert res["saved_master_dtypes"] == {"torch.float32"}
        for name, w in res["a"].items():
            assert np.array_equal(w, res["b"][name]), name
        assert "parallel.distributed_optimizer=true needs every trainable parameter in one dtype" in res.get(
            "zero_error", ""
        ), res.get("zero_error")
