"""`egrsd experiment --quick` end to end with real processes: an experiment SIGKILLed in the middle of a
training run (OPSD under torchrun at TP=2) and rerun gives the same outcomes, summary, training logs and
final weights as an uninterrupted one, without redoing finished work; a benchmark added afterwards is
evaluated for every model without retraining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Two runs keep this test short: grpo (TP=1, reward 0 on random weights: no update) and opsd (TP=2 under
# torchrun, reward-free: its weights do move, so equal weights after the kill mean something).
SMALL = ["methods=[grpo,opsd]", "per_method.grpo.seeds=[1]"]
TIMING_KEYS = ("elapsed_s", "eta_s", "tokens_per_s")


def _cmd(out, *extra):
    return [sys.executable, "-m", "egrsd_megatron.cli", "experiment", "--quick", "--out", str(out), *SMALL, *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


def _run(out, log, *extra):
    with open(log, "a") as f:
        r = subprocess.run(_cmd(out, *extra), cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    assert r.returncode == 0, open(log).read()[-3000:]


def _read(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def _weights(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    step = open(os.path.join(ckpt, "latest")).read().strip()
    out = {}
    for root, _, files in os.walk(os.path.join(ckpt, step, "model")):
        for f in files:
            if f == "model_optim_rng.pt":
                sd = torch.load(os.path.join(root, f), map_location="cpu", weights_only=True)["model"]
                out.update({f"{os.path.basename(root)}/{k}": v for k, v in sd.items() if torch.is_tensor(v)})
    return out


def _launches(out, name):
    return json.load(open(os.path.join(out, "runs", name, "run.json")))["launches"]


@pytest.mark.slow
def test_killed_experiment_resumes_to_the_same_outputs(tmp_path):
    a, b, log = tmp_path / "a", tmp_path / "b", tmp_path / "log.txt"
    _run(a, log)

    # B: SIGKILL the whole process group (experiment + torchrun + ranks) once opsd has its step-1 checkpoint.
    proc = subprocess.Popen(
        _cmd(b), cwd=ROOT, env=_env(), stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True
    )
    latest = b / "runs" / "opsd_s1" / "checkpoints" / "latest"
    t0 = time.monotonic()
    while not latest.exists():
        assert proc.poll() is None, f"experiment exited ({proc.returncode}) before the kill point"
        assert time.monotonic() - t0 < 600, "timed out waiting for opsd's first checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.load(open(b / "runs" / "opsd_s1" / "run.json"))["status"] == "started"  # killed mid-training
    assert not (b / "summary.json").exists()
    _run(b, log)
    assert _launches(b, "grpo_s1") == 1 and _launches(b, "opsd_s1") == 2  # finished work was not redone

    for model in ("base", "grpo_s1", "opsd_s1"):
        for bench in ("synth", "arith"):
            rel = os.path.join("eval", model, f"{bench}.jsonl")
            assert open(a / rel).read() == open(b / rel).read(), rel
    sa, sb = json.load(open(a / "summary.json")), json.load(open(b / "summary.json"))
    for key in ("results", "differences", "statements", "groups"):
        assert sa[key] == sb[key], key
    for name in ("grpo_s1", "opsd_s1"):
        ma = [
            {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")}
            for r in _read(a / "runs" / name / "metrics.jsonl")
        ]
        mb = [
            {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("time/")}
            for r in _read(b / "runs" / name / "metrics.jsonl")
        ]
        assert ma == mb and [r["step"] for r in ma] == [1, 2], name
        assert _read(a / "runs" / name / "samples.jsonl") == _read(b / "runs" / name / "samples.jsonl"), name
    wa, wb = _weights(a / "runs" / "opsd_s1"), _weights(b / "runs" / "opsd_s1")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = _weights_of_base(a)
    assert any(not torch.equal(wa[k], base[k]) for k in wa if k in base), "opsd did not move: the check is vacuous"

    # The summary's point estimates, recomputed from the per-problem files.
    for bench in ("synth", "arith"):
        for model in ("base", "grpo", "opsd"):
            rows = _read(a / "eval" / (model if model == "base" else f"{model}_s1") / f"{bench}.jsonl")
            res = sa["results"][bench][model]
            assert res["accuracy"]["estimate"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
            assert res["mean_length"]["estimate"] == pytest.approx(sum(r["length"] for r in rows) / len(rows))
    for png in ("frontier.png", "curves.png"):
        assert os.path.getsize(a / png) > 10_000

    # A benchmark added to the finished experiment: evaluated for every model, nothing retrained.
    before = {p: os.path.getmtime(p) for p in (a / "eval").rglob("*.jsonl") if "raw" not in p.parts}
    _run(a, log, "benchmarks.extra={synth: {n: 4, seed: 9, phrasing: scene}}")
    assert _launches(a, "grpo_s1") == 1 and _launches(a, "opsd_s1") == 1
    assert all(os.path.getmtime(p) == t for p, t in before.items())
    for model in ("base", "grpo_s1", "opsd_s1"):
        assert len(_read(a / "eval" / model / "extra.jsonl")) == 4
    s2 = json.load(open(a / "summary.json"))
    assert s2["panels"] == ["synth", "arith", "extra", "all"] and "extra" in open(a / "summary.md").read()


def _weights_of_base(out):
    sd = {}
    base = out / "base" / "megatron_tp2" / "release"
    for root, _, files in os.walk(base):
        for f in files:
            if f == "model_optim_rng.pt":
                m = torch.load(os.path.join(root, f), map_location="cpu", weights_only=True)["model"]
                sd.update({f"{os.path.basename(root)}/{k}": v for k, v in m.items() if torch.is_tensor(v)})
    return sd
