"""train.ckpt_format=torch_dist (Megatron-Core dist_checkpointing) training checkpoints, on CPU over gloo.

- TP=2: a resume from the saved step equals the uninterrupted run bit for bit;
- reshard: the TP=2 x PP=1 checkpoint resumes at TP=1 x PP=2, and a TP=1 x PP=2 one at TP=2: the model
  AND the Adam states move to the other layout (losses and final weights within derived tolerances);
- interop: Megatron's own `dist_checkpointing.load(model.sharded_state_dict(), dir)` loads our folder into
  a fresh GPTModel at TP=1 x PP=2 (weights bitwise equal to the source); `egrsd convert megatron-to-hf`
  of the torch_dist folder writes the same Hugging Face tensors, bit for bit, as of the torch-format
  folder of the same weights;
- ZeRO-1 at DP=2: each DP rank saves and loads only its own states; a resume is bitwise, with either
  optimizer kind; the DP=2 checkpoint resumes at DP=1 (tolerances of test_zero.py).
Each test is one run_distributed call (non-daemonic ranks: dist_checkpointing's writer forks workers).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from egrsd_megatron.config import load_config
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.tolerance import FP32_U, adam_update_change
from tests.distributed.test_trainer import layout_tolerances
from tests.distributed.test_zero import (
    OPTIM,
    _ckpt,
    _data,
    _dp_change_tolerances,
    _overrides,
    _rows,
    _run,
    _weights,
)
from tests.unit.test_checkpoint_safety import Payload  # a pickled object whose load would run os.system

DIST = {"train.ckpt_format": "torch_dist"}


def _hf_weights(trainer) -> dict:
    """Collective: the full Hugging Face-named weights (layout independent), identical on every rank."""
    from egrsd_megatron.checkpoint.reshard import gather_hf_state_dict

    return {n: t.clone() for n, t in gather_hf_state_dict(trainer.model, trainer.arch)}


def _hf_adam_states(trainer) -> dict:
    """Collective: {state name: full Hugging Face-named tensors} of the (non-sharded) AdamW states, gathered
    like the weights (each parameter's .data swapped for its state tensor of the same shape meanwhile)."""
    out = {}
    params = list(trainer.model.parameters())
    data = [p.data for p in params]
    for name in ("exp_avg", "exp_avg_sq"):
        try:
            for p in params:
                p.data = trainer.optimizer.state[p][name]
            out[name] = _hf_weights(trainer)
        finally:
            for p, d in zip(params, data):
                p.data = d
    return out


def _run_from(overrides, before=None):
    """Build a Trainer (resuming as its config says), call `before(trainer)`, then train; returns both."""
    from egrsd_megatron.trainer.loop import Trainer

    trainer = Trainer(load_config(None, overrides))
    seen = before(trainer) if before is not None else None
    assert trainer.run() == 0
    return trainer, seen


def _read_hf(folder: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def tp_runs(rank, world, data, out):
    """A: TP=2, 4 steps (torch_dist checkpoints at 2 and 4). B: TP=2 from A's step 2 (bitwise).
    R1: TP=1 x PP=2 from A's step 2, checkpoints at 3 and 4. R2: TP=2 from R1's step 3.
    Then Megatron's own load of A's step-4 folder at TP=1 x PP=2, and both formats converted to HF."""
    from egrsd_megatron.checkpoint.convert import megatron_to_hf
    from egrsd_megatron.checkpoint.dist_format import FORMAT as DIST_FORMAT
    from egrsd_megatron.checkpoint.formats import load_checkpoint, save_checkpoint
    from egrsd_megatron.checkpoint.megatron_format import FORMAT as TORCH_FORMAT
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import build_model

    res = {}
    a, b, r1, r2 = (os.path.join(out, x) for x in ("a", "b", "r1", "r2"))
    tp2, pp2 = {"parallel.tp": 2}, {"parallel.pp": 2}
    ta = _run(_overrides(data, a, False, **DIST, **tp2, **{"train.save_every": 2}))
    res["a"], res["a_hf"] = _weights(ta), _hf_weights(ta)
    torch_dir = os.path.join(out, "a_torch_format")  # the same weights in the per-rank torch format
    save_checkpoint(ta.model, ta.arch, torch_dir, fmt=TORCH_FORMAT)
    tb, res["b_adam"] = _run_from(
        _overrides(data, b, False, **DIST, **tp2, **{"train.resume": _ckpt(a, 2)}), _hf_adam_states
    )
    res["b"] = _weights(tb)
    t1, res["r1_adam"] = _run_from(
        _overrides(data, r1, False, **DIST, **pp2, **{"train.save_every": 1, "train.resume": _ckpt(a, 2)}),
        _hf_adam_states,
    )
    res["r1_hf"] = _hf_weights(t1)
    t2 = _run(_overrides(data, r2, False, **DIST, **tp2, **{"train.resume": _ckpt(r1, 3)}))
    res["r2_hf"] = _hf_weights(t2)

    # Megatron's own loader, into a fresh GPTModel at TP=1 x PP=2.
    from megatron.core import dist_checkpointing

    init_distributed(1, 2, seed=7)
    cfg = load_config(None, _overrides(data, os.path.join(out, "fresh"), False, **pp2))
    fresh = build_model(ta.arch, cfg.model)
    loaded = dist_checkpointing.load(fresh.sharded_state_dict(), os.path.join(_ckpt(a, 4), "model"))
    fresh.load_state_dict(loaded, strict=True)
    ta.model = fresh  # _hf_weights gathers trainer.model at the current layout
    res["megatron_load_hf"] = _hf_weights(ta)
    # Ours (formats.load_checkpoint, as model.init_from=megatron does) into another fresh model; then the
    # model alone saved at TP=1 x PP=2 through formats.save_checkpoint in torch_dist.
    ta.model = build_model(ta.arch, cfg.model)
    load_checkpoint(ta.model, ta.arch, os.path.join(_ckpt(a, 4), "model"))
    res["our_load_hf"] = _hf_weights(ta)
    pp2_dir = os.path.join(out, "model_pp2_torch_dist")
    save_checkpoint(ta.model, ta.arch, pp2_dir, fmt=DIST_FORMAT)
    res["foreign"] = foreign_objects(rank, ta, _ckpt(a, 2), out)
    if rank == 0:
        res["rows"] = {x: _rows(os.path.join(out, x)) for x in ("a", "b", "r1", "r2")}
        step2 = _ckpt(a, 2)
        res["files"] = sorted(os.path.relpath(os.path.join(d, f), step2) for d, _, fs in os.walk(step2) for f in fs)
        hf_dist, hf_torch = os.path.join(out, "hf_dist"), os.path.join(out, "hf_torch")
        megatron_to_hf(os.path.join(_ckpt(a, 4), "model"), hf_dist)
        megatron_to_hf(torch_dir, hf_torch)
        megatron_to_hf(pp2_dir, os.path.join(out, "hf_pp2"))
        res["hf_dist"], res["hf_torch"] = _read_hf(hf_dist), _read_hf(hf_torch)
        res["hf_pp2"] = _read_hf(os.path.join(out, "hf_pp2"))
    return res


def foreign_objects(rank, trainer, src, out):
    """Copies of a step folder with a foreign object in `.metadata`, then in common.pt (each manifest
    rewritten to match): load_train_state refuses each by name before dist_checkpointing unpickles it."""
    import pickle
    import shutil

    import torch
    import torch.distributed as dist

    from egrsd_megatron.checkpoint.manifest import MANIFEST_FILE, write_manifest
    from egrsd_megatron.checkpoint.safe_load import UnsafeCheckpointError, load_dcp_metadata
    from egrsd_megatron.checkpoint.train_state import load_train_state

    found = {}
    marker = os.path.join(out, "pwned")
    for what in (".metadata", "common.pt"):
        bad = os.path.join(out, "foreign_" + what.strip("."))
        if rank == 0:
            shutil.copytree(src, bad)
            f = os.path.join(bad, "model", what)
            if what == ".metadata":
                md = load_dcp_metadata(f)
                md.planner_data = Payload(marker)
                with open(f, "wb") as fh:
                    pickle.dump(md, fh)
            else:
                torch.save({"evil": Payload(marker)}, f)
            os.remove(os.path.join(bad, MANIFEST_FILE))
        dist.barrier()
        write_manifest(bad)
        try:
            load_train_state(bad, trainer.model, trainer.arch, trainer.optimizer, trainer.scheduler)
            found[what] = None
        except UnsafeCheckpointError as e:
            found[what] = str(e)
        found["pwned"] = os.path.exists(marker)
    return found


@pytest.mark.slow
def test_torch_dist_tp2_resume_reshard_interop_convert(tmp_path):
    data = _data(tmp_path)
    results = run_distributed(tp_runs, 2, data, str(tmp_path), timeout=1500, daemon=False)
    r0 = results[0]
    rows = r0["rows"]
    files = r0["files"]
    for f in ("model/.metadata", "model/common.pt", "model/metadata.json", "model/egrsd_checkpoint.json"):
        assert f in files, files
    assert any(f.startswith("model/__") and f.endswith(".distcp") for f in files), files
    assert {"optim/state.pt", "rng/rank_00000.pt", "rng/rank_00001.pt", "manifest.json"} <= set(files), files
    assert not any(f.startswith("optim/mp_rank") for f in files), files  # no per-rank torch optimizer files

    # A foreign object in `.metadata` (torch unpickles it with plain pickle) or in common.pt is refused
    # by name, on every rank, before anything from it is constructed.
    for res in results:
        f = res["foreign"]
        assert f[".metadata"] and "model/.metadata" in f[".metadata"] and "system" in f[".metadata"], f
        assert f["common.pt"] and "model/common.pt" in f["common.pt"] and "system" in f["common.pt"], f
        assert not f["pwned"]

    # Bitwise: the TP=2 resume from A's step 2 repeats A's steps 3 and 4.
    assert [r["step"] for r in rows["a"]] == [1, 2, 3, 4] and [r["step"] for r in rows["b"]] == [3, 4]
    for key in ("loss", "grad_norm", "lr", "accuracy"):
        assert [r[key] for r in rows["b"]] == [r[key] for r in rows["a"][2:]], key
    for res in results:
        for name, w in res["a"].items():
            assert np.array_equal(w, res["b"][name]), name

    # The Adam states as loaded at TP=1 x PP=2 (R1) are A's step-2 states as loaded at TP=2 (B, which then
    # repeats A bitwise): resharding copies them bit for bit, like the weights.
    for name in ("exp_avg", "exp_avg_sq"):
        b_st, r1_st = r0["b_adam"][name], r0["r1_adam"][name]
        assert set(b_st) == set(r1_st) == set(r0["a_hf"])
        assert all(np.abs(t).max() > 0 for t in b_st.values()), name  # real states, not zeros
        for n, t in b_st.items():
            assert np.array_equal(t, r1_st[n]), (name, n)

    # Reshard TP=2 -> TP=1 x PP=2 (R1, steps 3-4) and back (R2 from R1's step 3: step 4).
    # The resumed step starts from the saved weights exactly (resharding copies bits): its loss differs
    # from A's only by the layouts' reduction order (test_trainer.layout_tolerances: per-token log-prob
    # rounding over the reordered TP/PP reductions, averaged over the step's tokens). The next step adds
    # what the first update carries over: Adam's update moves by <= 2 lr/eps x the gradient's reordering
    # error (adam_update_change), x the step-4 gradient; a resumed optimizer that lost its moments would
    # take a fresh Adam step instead (update ~lr per element, ~1e-3 x sqrt(P) in L2), far outside it.
    cfg = load_config(None, _overrides(data, str(tmp_path / "cfg"), False))
    ref = {k: [r[k] for r in rows["a"][2:]] for k in ("loss", "grad_norm", "lr", "response_length", "accuracy")}
    atol, rtol = layout_tolerances(cfg, ref)
    assert [r["step"] for r in rows["r1"]] == [3, 4] and [r["step"] for r in rows["r2"]] == [4]
    for x, steps in (("r1", [0, 1]), ("r2", [1])):
        got = rows[x]
        for j, s in enumerate(steps):
            # Same weights, per-rollout seeds: the same rollouts (else the comparison below is meaningless).
            assert got[j]["accuracy"] == ref["accuracy"][s] and got[j]["response_length"] == ref["response_length"][s]
            assert got[j]["lr"] == ref["lr"][s]
            assert abs(got[j]["loss"] - ref["loss"][s]) <= atol[s], (x, s, got[j]["loss"], ref["loss"][s], atol[s])
            gn = ref["grad_norm"][s]
            assert abs(got[j]["grad_norm"] - gn) <= rtol[s] * gn, (x, s, got[j]["grad_norm"], gn, rtol[s])
    # Final weights: A, R1 and R2 each took steps 3 and 4 from A's step-2 state at TP=2 / PP=2 / PP2+TP2.
    # Each step's update differs by <= adam_update_change(lr, eps, |dg|) in L2 with |dg| <= rtol min(|g|,
    # clip) (the clipped gradient's reordering error), two steps, plus one rounding of |w| <= 1 per update.
    lr, eps, clip = OPTIM["optim.lr"], OPTIM["optim.eps"], OPTIM["optim.clip_grad"]
    w_tol = sum(adam_update_change(lr, eps, rtol[s] * min(ref["grad_norm"][s], clip)) for s in (0, 1)) + 4 * FP32_U
    for x in ("r1_hf", "r2_hf"):
        diff = max(float(np.abs(w - r0[x][n]).max()) for n, w in r0["a_hf"].items())
        print(f"A vs {x}: max |dw| {diff:.3g} / tolerance {w_tol:.3g}")
        assert diff <= w_tol, (x, diff, w_tol)

    # Megatron's own dist_checkpointing.load at another layout, and ours: the saved weights, bit for bit.
    for name, w in r0["a_hf"].items():
        assert np.array_equal(w, r0["megatron_load_hf"][name]), name
        assert np.array_equal(w, r0["our_load_hf"][name]), name
    # megatron-to-hf reads the torch_dist folder: the same tensors as from the torch-format folder.
    assert set(r0["hf_dist"]) == set(r0["hf_torch"]) == set(r0["a_hf"])
    # The model-only torch_dist folder written at TP=1 x PP=2 (layers on two stages) converts the same.
    assert set(r0["hf_pp2"]) == set(r0["hf_torch"])
    for name, t in r0["hf_torch"].items():
        assert np.array_equal(t, r0["hf_dist"][name]), name
        assert np.array_equal(t, r0["hf_pp2"][name]), name
        assert np.array_equal(t, r0["a_hf"][name]), name


# ------------------------------------------------------------------ ZeRO-1 at DP=2
def zero_runs(rank, world, data, out):
    """A: ZeRO torch_dist, 4 steps (checkpoints at 2, 4). B: ZeRO from A's step 2. C: AdamW from A's step
    2 (checkpoints at 3, 4). E: ZeRO from C's step 3. What each rank holds of A's step-2 states."""
    import torch

    from egrsd_megatron.checkpoint.dist_format import stored_tensors
    from egrsd_megatron.checkpoint.optimizer_state import owned_indices

    res = {}
    a, b, c, e = (os.path.join(out, x) for x in "abce")
    ta = _run(_overrides(data, a, True, **DIST, **{"train.save_every": 2}))
    res["a"] = _weights(ta)
    tb = _run(_overrides(data, b, True, **DIST, **{"train.resume": _ckpt(a, 2)}))
    res["b"] = _weights(tb)
    res["c"] = _weights(
        _run(_overrides(data, c, False, **DIST, **{"train.save_every": 1, "train.resume": _ckpt(a, 2)}))
    )
    res["e"] = _weights(_run(_overrides(data, e, True, **DIST, **{"train.resume": _ckpt(c, 3)})))
    # After B's load: this rank's local optimizer holds states for exactly the parameters it owns.
    local = tb.optimizer.optim.state
    params = [p for g in tb.optimizer.param_groups for p in g["params"]]
    res["owned"] = sorted(owned_indices(tb.optimizer))
    res["with_state"] = sorted(i for i, p in enumerate(params) if local.get(p))
    res["state_dtypes"] = sorted({str(t.dtype) for st in local.values() for t in st.values() if torch.is_tensor(t)})
    if rank == 0:
        res["rows"] = {x: _rows(os.path.join(out, x)) for x in "abce"}
        stored = stored_tensors(os.path.join(_ckpt(a, 2), "model"))
        res["state_keys"] = sorted(k for k in stored if k.startswith("optimizer.state."))
    return res


def dp1_run(rank, world, data, src, out):
    """The DP=2 ZeRO torch_dist checkpoint resumed at DP=1 with AdamW."""
    run_dir = os.path.join(out, "dp1")
    w = _weights(_run(_overrides(data, run_dir, False, **DIST, **{"train.resume": src})))
    return {"w": w, "rows": _rows(run_dir)}


@pytest.mark.slow
def test_torch_dist_zero1_dp2_resume_bitwise_kinds_and_dp1(tmp_path):
    data = _data(tmp_path)
    one_thread = {"OMP_NUM_THREADS": "1"}  # the DP-change comparison needs equal thread counts (test_zero)
    results = run_distributed(zero_runs, 2, data, str(tmp_path), timeout=1500, env=one_thread, daemon=False)
    rows = results[0]["rows"]
    # Each DP rank owns a disjoint share of the parameters and loaded states for exactly those.
    owned = [set(r["owned"]) for r in results]
    assert not owned[0] & owned[1] and owned[0] and owned[1]
    for r in results:
        assert r["with_state"] == r["owned"] and r["state_dtypes"] == ["torch.float32"]
    keys = results[0]["state_keys"]
    assert any(".exp_avg." in k for k in keys) and any(".exp_avg_sq." in k for k in keys), keys
    # Bitwise: B (ZeRO) and C (AdamW) from A's step 2, E (ZeRO) from C's step 3, all repeat A.
    assert [r["step"] for r in rows["b"]] == [r["step"] for r in rows["c"]] == [3, 4] and [
        r["step"] for r in rows["e"]
    ] == [4]
    for x in "bce":
        n = len(rows[x])
        for key in ("loss", "grad_norm", "lr"):
            assert [r[key] for r in rows[x]] == [r[key] for r in rows["a"][-n:]], (x, key)
        for res in results:
            for name, w in res["a"].items():
                assert np.array_equal(w, res[x][name]), (x, name)

    # DP=2 -> DP=1 (AdamW): test_zero's derived tolerances for this setup (same OPTIM, one thread).
    res = run_distributed(
        dp1_run,
        1,
        data,
        _ckpt(str(tmp_path / "a"), 2),
        str(tmp_path / "dp1"),
        timeout=900,
        env=one_thread,
        daemon=False,
    )[0]
    ref = rows["a"][2:]
    tol = _dp_change_tolerances(ref)
    assert [r["step"] for r in res["rows"]] == [3, 4] and [r["lr"] for r in res["rows"]] == [r["lr"] for r in ref]
    for k in ("accuracy", "loss", "grad_norm"):
        got, want = [r[k] for r in res["rows"]], [r[k] for r in ref]
        assert all(abs(x - y) <= t for x, y, t in zip(got, want, tol[k])), (k, got, want, tol[k])
    wdiff = max(float(np.abs(w - res["w"][n]).max()) for n, w in results[0]["a"].items())
    assert wdiff <= tol["weights"], (wdiff, tol["weights"])


# ------------------------------------------------------------------ bf16 parameters: fp32 masters reshard
def _hf_masters(model, arch, optimizer) -> dict:
    """Collective: MasterWeightAdamW's fp32 masters as full Hugging Face-named tensors (swapped in as .data)."""
    from egrsd_megatron.checkpoint.reshard import gather_hf_state_dict

    params = list(model.parameters())
    data = [p.data for p in params]
    try:
        for p in params:
            p.data = optimizer.state[p]["master"]
        return {n: t.clone() for n, t in gather_hf_state_dict(model, arch)}
    finally:
        for p, d in zip(params, data):
            p.data = d


def bf16_reshard(rank, world, out):
    """bf16 parameters with MasterWeightAdamW at TP=2 (and a sync teacher): two steps, a torch_dist save, a
    load at TP=1 x PP=2."""
    import torch

    from egrsd_megatron.checkpoint import train_state as ts
    from egrsd_megatron.checkpoint.reshard import gather_hf_state_dict
    from egrsd_megatron.config.schema import ModelConfig, OptimConfig
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import PRESETS, build_model
    from egrsd_megatron.trainer.optim import MasterWeightAdamW, build_optimizer, build_scheduler

    arch, mcfg, ocfg = PRESETS["qwen3_tiny"], ModelConfig(params_dtype="bf16"), OptimConfig(lr=1e-2)

    def fresh():
        model = build_model(arch, mcfg)
        opt = build_optimizer([model], ocfg)
        return model, opt, build_scheduler(opt, 10, ocfg)

    init_distributed(2, 1, seed=3)
    model, opt, sched = fresh()
    assert type(opt) is MasterWeightAdamW
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)  # the same on both TP ranks: replicated norms stay equal
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
        opt.step()
        sched.step()
    teacher = build_model(arch, mcfg)  # a sync teacher (other random weights) travels in the same folder
    path = ts.save_train_state(
        os.path.join(out, "ck"), 2, model, arch, opt, sched, {"step": 2}, 3, teacher=teacher, fmt="torch_dist"
    )
    res = {"masters": _hf_masters(model, arch, opt)}
    res["weights"] = {n: t.float() for n, t in gather_hf_state_dict(model, arch)}
    res["teacher"] = {n: t.float() for n, t in gather_hf_state_dict(teacher, arch)}
    init_distributed(1, 2, seed=5)
    m2, o2, s2 = fresh()
    t2 = build_model(arch, mcfg)
    ts.load_train_state(path, m2, arch, o2, s2, teacher=t2)
    res["teacher2"] = {n: t.float() for n, t in gather_hf_state_dict(t2, arch)}
    res["masters2"] = _hf_masters(m2, arch, o2)
    res["weights2"] = {n: t.float() for n, t in gather_hf_state_dict(m2, arch)}
    res["dtypes"] = sorted({str(t.dtype) for st in o2.state.values() for t in st.values()})
    res["sched"] = (s2.last_epoch, sched.last_epoch)
    return res


def test_torch_dist_bf16_fp32_masters_and_teacher_reshard(tmp_path):
    res = run_distributed(bf16_reshard, 2, str(tmp_path), timeout=600, daemon=False)[0]
    assert res["dtypes"] == ["torch.float32"] and res["sched"] == (2, 2)
    off_grid = 0
    for n, m in res["masters"].items():
        assert m.dtype == np.float32
        assert np.array_equal(m, res["masters2"][n]), n  # the fp32 masters, resharded bit for bit
        assert np.array_equal(res["weights"][n], res["weights2"][n]), n
        # The bf16 weights (as fp32) differ from the fp32 masters where a master is off the bf16 grid.
        off_grid += int((m != res["weights"][n]).sum())
    assert off_grid > 0  # the masters hold more than the bf16 weights: they were really saved and restored
    for n, t in res["teacher"].items():  # the sync teacher, resharded too (and not the student's weights)
        assert np.array_equal(t, res["teacher2"][n]), n
    assert any(not np.array_equal(t, res["weights"][n]) for n, t in res["teacher"].items())
