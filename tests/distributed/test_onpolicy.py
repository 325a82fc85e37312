"""On-policy training (issue 15): the trainer's log-probs are of the distribution the engine sampled from.

- At T = 0.7 (fp32, tiny Qwen3) the engine's sampled-token log-probs equal the trainer's student log-probs
  at TP=1 and TP=2, at step 1 and after an update (the refit reached the engine).
- Negative controls, with the fault injected here, not in the product: an engine that is never refitted
  makes the first step abort (exit 4) naming the likely causes; an engine refitted only once shows a large
  mismatch at step 2 and the run goes on with a warning.
- A NaN logit in the student's output takes the skip-the-step path on every rank (TP=2), not a crash.
- OPSD (reward-free loss) still scores its rollouts, so its accuracy is real.
- Refused sampling settings exit 2 naming the key.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from egrsd_megatron.cli import main as cli_main
from egrsd_megatron.config import load_config
from egrsd_megatron.rewards import register_reward
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.tiny import save_tiny_hf_model
from egrsd_megatron.testing.tolerance import FP32_U
from egrsd_megatron.trainer import loop
from tests.distributed.test_trainer import tiny_overrides, write_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 0.7
# The engine (HF transformers, KV-cached decoding) and the trainer (Megatron, one full forward) compute the
# same fp32 log-prob with the reductions in other orders; ~16 of its roundings happen at its own magnitude
# (|log p| <= log V / T = log 320 / 0.7 = 8.2 for the near-uniform random tiny model), so 4 sigma of that
# random walk is 4 * sqrt(16) * 2^-24 * 8.2 = 7.8e-6: below 1e-5.
LOGPROB_TOL = 1e-5
assert 4 * math.sqrt(16) * FP32_U * math.log(320) / T < LOGPROB_TOL


def nonempty(response: str, answer: str) -> float:  # noqa: ARG001 - reward signature
    """Reward 1 for any non-empty response: an accuracy a random tiny model gets, to see that scoring ran."""
    return 1.0 if response else 0.0


register_reward("nonempty", nonempty)


def _data(tmp_path, n: int = 16) -> str:
    """The training file and, beside it, the tiny HF model every run starts from (written here, once,
    before any rank reads it)."""
    data = write_data(str(tmp_path / "train.jsonl"), n=n)
    save_tiny_hf_model(str(tmp_path / "tiny_hf"))
    return data


def _rows(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _overrides(data: str, out: str, **extra) -> list:
    return tiny_overrides(data, out, **{"rollout.temperature": T, "loss.name": "cl_egrsd", "optim.lr": 1e-2, **extra})


def on_policy_runs(rank: int, world: int, data: str, out: str) -> dict:
    """OPSD: its gradient does not wait for a reward, so step 1 already moves the weights."""
    res = {}
    run = os.path.join(out, f"onpolicy_tp{world}")
    assert (
        loop.Trainer(load_config(None, _overrides(data, run, **{"parallel.tp": world, "loss.name": "opsd"}))).run() == 0
    )
    if rank == 0:
        res["rows"] = _rows(run)
    if world > 1:
        return res
    # Fault injection: the engine keeps the weights of its first refit (stale after the update).
    real_refit, calls = loop.refit, []

    def refit_once(engine, model, arch):
        if not calls:
            real_refit(engine, model, arch)
        calls.append(1)

    loop.refit = refit_once
    try:
        stale = os.path.join(out, "stale")
        code = loop.Trainer(
            load_config(None, _overrides(data, stale, **{"rollout.max_logprob_diff": 1e-3, "loss.name": "opsd"}))
        ).run()
        res["stale"] = (code, _rows(stale))
        loop.refit = lambda engine, model, arch: None  # never refitted: the engine's own random weights
        never = os.path.join(out, "never")
        res["never"] = loop.Trainer(load_config(None, _overrides(data, never))).run()
    finally:
        loop.refit = real_refit
    return res


@pytest.mark.slow
def test_trainer_logprobs_equal_the_engines_at_the_sampling_temperature(tmp_path):
    data = _data(tmp_path)
    one = run_distributed(on_policy_runs, 1, data, str(tmp_path), timeout=600)[0]
    two = run_distributed(on_policy_runs, 2, data, str(tmp_path), timeout=600)[0]
    for rows in (one["rows"], two["rows"]):
        assert len(rows) == 2 and rows[0]["grad_norm"] > 0  # step 1 moved the weights: step 2 checks the refit
        for r in rows:
            assert r["logprob_diff_max"] < LOGPROB_TOL and r["logprob_diff_mean"] < LOGPROB_TOL, r
            assert r["prob_ratio_error"] == pytest.approx(r["logprob_diff_mean"], rel=1e-3)  # e^d - 1 ~ d
    # Stale engine after step 1: the mismatch at step 2 is many orders above rounding; a warning, not an abort.
    code, stale = one["stale"]
    assert code == 0 and stale[0]["logprob_diff_mean"] < LOGPROB_TOL
    assert stale[1]["logprob_diff_mean"] > 1e3 * LOGPROB_TOL, stale[1]
    # An engine that never got the trainer's weights: the first step aborts.
    assert one["never"] == loop.OFF_POLICY_EXIT_CODE


def nan_logit_run(rank: int, world: int, data: str, out: str) -> tuple:
    trainer = loop.Trainer(
        load_config(
            None, _overrides(data, out, **{"parallel.tp": world, "train.steps": 2, "train.max_nonfinite_in_row": 2})
        )
    )
    calls = []

    def poison_first_forward(module, inputs, output):
        # The student's first training forward (step 1's student pass) gets NaN logits in one column on TP rank 0 only:
        # token_stats must notice it on both ranks, and the step must be skipped everywhere.
        calls.append(1)
        if len(calls) == 1 and rank == 0:
            logits = output[0].clone()
            logits[..., 7] = float("nan")  # one vocabulary column, at every position
            return (logits, *output[1:])
        return output

    trainer.model.output_layer.register_forward_hook(poison_first_forward)
    code = trainer.run()
    return code, _rows(out) if rank == 0 else None


@pytest.mark.slow
def test_nan_logit_skips_the_step_on_every_rank(tmp_path):
    data = _data(tmp_path)
    results = run_distributed(nan_logit_run, 2, data, str(tmp_path / "nan"), timeout=600)
    assert [code for code, _ in results] == [0, 0]
    rows = results[0][1]
    assert rows[0]["skipped"] == 1.0 and rows[0]["nonfinite_logits"] >= 1 and math.isnan(rows[0]["loss"])
    assert rows[1]["skipped"] == 0.0 and math.isfinite(rows[1]["loss"]) and rows[1]["nonfinite_skipped_total"] == 1


def opsd_scored(rank: int, world: int, data: str, out: str) -> dict:
    acc = {}
    for name in ("opsd", "grpo"):
        run = os.path.join(out, name)
        assert (
            loop.Trainer(
                load_config(
                    None, _overrides(data, run, **{"loss.name": name, "train.steps": 1, "reward.name": "nonempty"})
                )
            ).run()
            == 0
        )
        acc[name] = _rows(run)[0]["accuracy"]
    return acc


@pytest.mark.slow
def test_opsd_rollouts_are_scored_for_the_logs(tmp_path):
    data = _data(tmp_path)
    acc = run_distributed(opsd_scored, 1, data, str(tmp_path), timeout=600)[0]
    assert acc["opsd"] == acc["grpo"] > 0  # the same step-1 rollouts, scored the same


@pytest.mark.parametrize("key,value", [("rollout.temperature", 0), ("rollout.top_p", 0.9), ("rollout.top_k", 20)])
def test_refused_sampling_exits_2_naming_the_key(tmp_path, capsys, key, value):
    data = _data(tmp_path, n=4)
    args = _overrides(data, str(tmp_path / "o"), **{key: value})
    assert cli_main(["train", os.path.join(REPO, "conf", "tiny_cpu.yaml"), *args]) == 2
    assert key in capsys.readouterr().err
