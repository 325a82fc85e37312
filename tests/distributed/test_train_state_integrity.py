"""Training checkpoints (checkpoint/train_state.py) on one gloo rank with a tiny GPTModel, in both formats
(train.ckpt_format torch and torch_dist: for torch_dist every dist_checkpointing file is damaged in turn too):

- each file of the newest checkpoint damaged in turn (delete, truncate, flip a byte): train.resume=auto
  falls back to the previous complete checkpoint with a warning naming the file; naming the damaged
  folder explicitly is a DamagedCheckpointError naming it; never an error from inside torch;
- a save that fails mid-way (one write raises) leaves the previous checkpoint and `latest` untouched;
- a foreign pickled object (with a manifest rewritten to match) is refused by name, nothing runs;
- a resume restores the weights, Adam states, scheduler and RNG bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from egrsd_megatron.testing import run_distributed
from tests.unit.test_checkpoint_safety import Payload  # a pickled object whose load would run os.system


def _setup():
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import PRESETS, build_model

    init_distributed(1, 1, seed=3)
    arch = PRESETS["qwen3_tiny"]

    def fresh():
        model = build_model(arch, ModelConfig())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        return model, opt, sched

    return arch, fresh


def _step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sched.step()


def _flip(path):
    b = bytearray(open(path, "rb").read())
    b[len(b) // 2] ^= 0x10
    open(path, "wb").write(bytes(b))


DAMAGE = {
    "delete": os.remove,
    "flip": _flip,
    "truncate": lambda p: open(p, "r+b").truncate(max(0, os.path.getsize(p) - 9)),
}


def integrity(rank, world, out, fmt):
    from egrsd_megatron.checkpoint import train_state as ts
    from egrsd_megatron.checkpoint.manifest import MANIFEST_FILE, write_manifest
    from egrsd_megatron.checkpoint.safe_load import UnsafeCheckpointError

    arch, fresh = _setup()
    root = os.path.join(out, "checkpoints")
    model, opt, sched = fresh()
    _step(model, opt, sched, 1)
    ts.save_train_state(root, 1, model, arch, opt, sched, {"step": 1}, keep_last=5, fmt=fmt)
    _step(model, opt, sched, 2)
    rng_at_save = torch.get_rng_state()
    s2 = ts.save_train_state(root, 2, model, arch, opt, sched, {"step": 2}, keep_last=5, fmt=fmt)
    res = {"latest": open(os.path.join(root, "latest")).read().strip()}
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_opt = opt.state_dict()

    # Bitwise restore of everything (into a freshly built model, optimizer and scheduler).
    torch.manual_seed(99)
    m2, o2, sc2 = fresh()
    assert ts.resolve_resume("auto", root) == s2
    state = ts.load_train_state(s2, m2, arch, o2, sc2, verified=True)
    res["state"] = state
    res["weights_equal"] = all(torch.equal(p, want[n]) for n, p in m2.named_parameters())
    got_opt = o2.state_dict()
    res["adam_equal"] = all(torch.equal(got_opt["state"][i][k], v[k]) for i, v in want_opt["state"].items() for k in v)
    res["sched"] = (sc2.last_epoch, sched.last_epoch)
    res["rng_equal"] = torch.equal(torch.get_rng_state(), rng_at_save)

    # Damage each file kind of the newest checkpoint in turn.
    files = sorted(os.path.relpath(os.path.join(d, f), s2) for d, _, fs in os.walk(s2) for f in fs)
    res["files"] = files
    pristine = s2 + ".pristine"
    shutil.copytree(s2, pristine)
    res["damage"] = {}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("egrsd_megatron.checkpoint.train_state").addHandler(handler)
    for rel in files:
        for how, fn in DAMAGE.items():
            shutil.rmtree(s2)
            shutil.copytree(pristine, s2)
            fn(os.path.join(s2, rel))
            records.clear()
            picked = ts.resolve_resume("auto", root)
            warning = " ".join(r.getMessage() for r in records)
            try:
                ts.resolve_resume(s2, root)
                explicit = None
            except ts.DamagedCheckpointError as e:
                explicit = str(e)
            res["damage"][(rel, how)] = (picked, warning, explicit)
    shutil.rmtree(s2)
    shutil.copytree(pristine, s2)
    shutil.rmtree(pristine)

    # A save failing mid-way (the RNG file write raises): step 3 never appears, 1 and 2 are intact.
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if "rng" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    torch.save = failing
    try:
        ts.save_train_state(root, 3, model, arch, opt, sched, {"step": 3}, keep_last=5, fmt=fmt)
        res["failed_save"] = None
    except OSError as e:
        res["failed_save"] = str(e)
    finally:
        torch.save = real_save
    res["after_failure"] = (
        sorted(os.listdir(root)),
        open(os.path.join(root, "latest")).read().strip(),
        ts.resolve_resume("auto", root),
    )

    # A foreign object in the optimizer file, the manifest rewritten to match: refused by name.
    marker = os.path.join(out, "pwned")
    optim = os.path.join(s2, "optim", OPTIM_FILE[fmt])
    payload = torch.load(optim, weights_only=True)
    payload["opt_param_scheduler"]["evil"] = Payload(marker)
    torch.save(payload, optim)
    os.remove(os.path.join(s2, MANIFEST_FILE))
    write_manifest(s2)
    try:
        ts.load_train_state(s2, m2, arch, o2, sc2)
        res["foreign"] = None
    except UnsafeCheckpointError as e:
        res["foreign"] = str(e)
    res["pwned"] = os.path.exists(marker)
    return res


# The file holding the scheduler state, per train.ckpt_format (where the foreign object goes).
OPTIM_FILE = {"torch": "mp_rank_00.pt", "torch_dist": "state.pt"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_damage_fallback_failed_save_and_foreign_objects(tmp_path, fmt):
    # daemon=False: dist_checkpointing's torch_dist writer forks worker processes.
    res = run_distributed(integrity, 1, str(tmp_path), fmt, timeout=600, daemon=False)[0]
    root = str(tmp_path / "checkpoints")
    s1, s2 = (os.path.join(root, f"step_{i:08d}") for i in (1, 2))
    assert res["latest"] == "step_00000002"
    assert res["state"] == {"step": 2} and res["weights_equal"] and res["adam_equal"] and res["rng_equal"]
    assert res["sched"][0] == res["sched"][1] == 2
    kinds = {f.split("/")[0] for f in res["files"]}
    assert {"model", "optim", "rng", "trainer_state.json", "manifest.json"} <= kinds, res["files"]
    if fmt == "torch_dist":  # dist_checkpointing's own files are damaged in turn too
        assert {"model/.metadata", "model/common.pt", "model/metadata.json"} <= set(res["files"]), res["files"]
        assert any(f.endswith(".distcp") for f in res["files"]), res["files"]
    for (rel, how), (picked, warning, explicit) in res["damage"].items():
        where = os.path.join(s2, rel)
        assert picked == s1, (rel, how, picked)  # never the damaged one: the previous complete checkpoint
        assert where in warning and s1 in warning, (rel, how, warning)
        assert explicit is not None and where in explicit, (rel, how, explicit)
    assert res["failed_save"] and "No space left" in res["failed_save"]
    names, latest, picked = res["after_failure"]
    assert names == ["latest", "step_00000001", "step_00000002"] and latest == "step_00000002" and picked == s2
    assert res["foreign"] and os.path.join(s2, "optim", OPTIM_FILE[fmt]) in res["foreign"], res["foreign"]
    assert "system" in res["foreign"] and not res["pwned"]
