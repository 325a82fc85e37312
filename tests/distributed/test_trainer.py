"""The training loop end to end on a tiny random Qwen3 (byte tokenizer), against single-process runs.

- every loss name gives the same per-step losses (and rewards) at TP=1, TP=2 and PP=2;
- a learnable toy reward rises under GRPO and EGRSD;
- config errors are raised before any work, naming the key.
Kill-and-resume and preemption (real subprocesses and signals) are in tests/integration/test_resume.py.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from egrsd_megatron.config import ConfigError, load_config
from egrsd_megatron.models import resolve_arch
from egrsd_megatron.rewards import register_reward
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.tiny import save_tiny_hf_model
from egrsd_megatron.testing.tolerance import FP32_U, adam_update_change

LOSSES = ["grpo", "rlsd", "egrsd", "cl_egrsd", "opsd"]
# Every loss, plus: the k3 KL to the reference policy (with a live teacher, so the reference is its own
# frozen copy rather than the frozen teacher's); OPSD's JSD signal (at PP=2 the one case that keeps every
# micro-batch's full teacher logits; the others keep only the teacher's per-token statistics); and two
# PPO epochs (teacher pass for all micro-batches up front, old log-probs from the first epoch).
VARIANTS = {
    **{name: {"loss.name": name} for name in LOSSES},
    "egrsd_kl_ref": {"loss.name": "egrsd", "loss.kl_coef": 0.5, "teacher.mode": "live"},
    "opsd_jsd": {"loss.name": "opsd", "loss.opsd.signal": "jsd"},
    "egrsd_2_epochs": {"loss.name": "egrsd", "train.ppo_epochs": 2},
}


def digit_fraction(response: str, answer: str) -> float:  # noqa: ARG001 - reward signature
    """Toy reward a random tiny model can learn: the fraction of response characters that are digits."""
    return sum(ch.isdigit() for ch in response) / max(1, len(response))


register_reward("digit_fraction", digit_fraction)


def write_data(path: str, n: int = 16, seed: int = 1) -> str:
    from egrsd_megatron.data.synth import generate_problems

    with open(path, "w") as f:
        for r in generate_problems(n, seed=seed):
            f.write(json.dumps(r) + "\n")
    return path


def tiny_overrides(data: str, out: str, **extra) -> list:
    """A tiny run; starts from the random HF model in the data folder (same weights at every TP/PP)."""
    hf = save_tiny_hf_model(os.path.join(os.path.dirname(data), "tiny_hf"))
    base = {
        "model.preset": "hf",
        "model.hf_path": hf,
        "model.init_from": "hf",
        "data.train_path": data,
        "prompt.thinking": "false",
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 8,
        "train.prompts_per_step": 2,
        "train.steps": 2,
        "train.save_every": 0,
        "train.sample_every": 0,
        "train.out_dir": out,
        "train.resume": "none",
        "logging.tensorboard": "false",
        "parallel.micro_batch_size": 4,
        "reward.name": "digit_fraction",
        "reward.num_workers": 1,
        "optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train(overrides: list) -> list:
    from egrsd_megatron.trainer.loop import Trainer

    trainer = Trainer(load_config(None, overrides))
    assert trainer.run() == 0
    return trainer


def run_all_losses(rank: int, world: int, tp: int, pp: int, data: str, out: str) -> dict:
    """Train 2 steps with every loss variant; return per-step losses and rewards (from rank 0's log)."""
    out_by_loss = {}
    for name, variant in VARIANTS.items():
        run_dir = os.path.join(out, f"{name}_tp{tp}_pp{pp}")
        # optim.eps=1e-4: Adam divides by sqrt(v) + eps, which turns gradient components that are pure
        # rounding noise (~1e-9, different per layout) into full lr-sized steps of random sign; a larger
        # eps keeps those tiny, so step 2 compares the same model rather than amplified noise.
        _train(tiny_overrides(data, run_dir, **{**variant, "parallel.tp": tp, "parallel.pp": pp, "optim.eps": 1e-4}))
        if rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            out_by_loss[name] = {
                k: [r[k] for r in rows] for k in ("loss", "accuracy", "response_length", "grad_norm", "lr")
            }
    return out_by_loss


def layout_tolerances(cfg, rows: dict) -> tuple:
    """(loss atol per step, grad-norm rtol per step) for one variant's run, derived from the arithmetic.

    Model: the layouts compute the same quantities with the reductions in another order (TP splits the
    matmuls' inner dimensions and the vocabulary logsumexp; PP only moves where they run), so each result
    differs by fp32 rounding alone, a random walk of ~sqrt(n) u of its magnitude for n reordered terms;
    every bound below is 4 sigma of that walk.
    - Per-token log-prob (student, teacher, reference) and teacher entropy: magnitude log V (the random tiny
      model is near-uniform: its teacher entropy is 5.756 of log 320 = 5.768); ~16 reordered roundings reach
      it at that magnitude (logsumexp over the shards and its cross-rank combine, the target-logit pick, the
      final subtraction): sigma_lp = sqrt(16) u log V ~ 1.4e-6.
    - Loss, a token mean over N tokens of terms whose error is W sigma_lp: atol = 4 W sigma_lp / sqrt(N).
      OPSD (sampled): term = -(lT - lS), W = sqrt(2); its KL/JSD signals are sums of p log p of the same
      magnitude, W = sqrt(2) too. Reward losses: term = -A rho g r with |A| <= sqrt(G - 1) (std-normalised
      group advantages), r <= 1 + eps_hi, d rho <= (1 + eps_w) d(lT - lS), d g <= (1 - g_min) / tau d H:
      W = sqrt(G - 1) (1 + eps_hi) ((1 + eps_w) sqrt(2) + (1 - g_min) / tau).
      This is an ABSOLUTE bound: the loss itself can be far smaller than its terms (OPSD's -mean(lT - lS)
      between two nearly equal models is ~1e-3 from terms of ~6, which is why a relative tolerance failed).
    - Grad norm (a norm: no cancellation of its own): each gradient entry is a contraction over N tokens x V
      vocabulary columns (output layer; the hidden sizes are smaller), reordered by TP: 4 u sqrt(N V)
      relative. OPSD's per-token weights (lT - lS) carry sqrt(2) sigma_lp ~ 2e-6 each; averaged over N
      tokens they add less than this as long as the weights' rms exceeds ~1e-3, which the test's own
      comparison would expose (it is the observed 3e-6 that has to fit under 3.4e-5).
    - Step 2 adds what step 1's update carries over. At Adam's first step the update is
      lr g / (|g| + eps) elementwise, whose derivative in g is at most lr / eps (testing.tolerance.
      adam_update_change allows 2 lr / eps, for later steps' moments), so the layouts' parameters differ by
      ||d theta|| <= 2 (lr / eps) ||d g_1|| <= 2 (lr / eps) rtol_1 min(|g_1|, clip); to first order
      the step-2 loss moves by |g_2| ||d theta||, and the step-2 grad norm by a relative ||d theta|| /
      ||theta|| that is below rtol_1 here (weights ~0.02 x sqrt(P), P ~ 1e5). Measured (OPSD, TP=1 vs TP=2):
      Adam eps from 1e-6 to 1 changes lr/eps by 1e6 and the step-2 loss difference stays 0.4-1.7e-7, so the
      carried-over update is not what dominates: each step's own rounding is.
    """
    n_tok = [2 * cfg.rollout.group_size * r for r in rows["response_length"]]  # prompts_per_step=2
    sigma_lp = 4 * FP32_U * math.log(cfg_vocab(cfg))
    if cfg.loss.name == "opsd":
        w = math.sqrt(2)
    else:
        lc = cfg.loss
        w = (
            math.sqrt(cfg.rollout.group_size - 1)
            * (1 + lc.clip.eps_hi)
            * ((1 + lc.ratio.eps_w) * math.sqrt(2) + (1 - lc.gate.g_min) / lc.gate.tau)
        )
    atol = [4 * w * sigma_lp / math.sqrt(n) for n in n_tok]
    rtol = [4 * FP32_U * math.sqrt(n * cfg_vocab(cfg)) for n in n_tok]
    lr1 = rows["lr"][0]
    carried = adam_update_change(
        lr1, cfg.optim.eps, rtol[0] * min(rows["grad_norm"][0], cfg.optim.clip_grad or math.inf)
    )
    atol = [atol[0]] + [a + carried * g for a, g in zip(atol[1:], rows["grad_norm"][1:])]
    rtol = [rtol[0]] + [2 * r for r in rtol[1:]]
    return atol, rtol


def cfg_vocab(cfg) -> int:
    return resolve_arch(cfg.model).vocab_size


@pytest.mark.slow
def test_losses_identical_across_tp_and_pp(tmp_path):
    data = write_data(str(tmp_path / "train.jsonl"))
    ref = run_distributed(run_all_losses, 1, 1, 1, data, str(tmp_path), timeout=600)[0]
    tp2 = run_distributed(run_all_losses, 2, 2, 1, data, str(tmp_path), timeout=600)[0]
    pp2 = run_distributed(run_all_losses, 2, 1, 2, data, str(tmp_path), timeout=600)[0]
    assert set(ref) == set(VARIANTS)
    for name, variant in VARIANTS.items():
        r = ref[name]
        # The rollouts must be the same (same weights, per-rollout seeds): rewards and lengths equal exactly.
        assert r["accuracy"] == tp2[name]["accuracy"] == pp2[name]["accuracy"], name
        assert r["response_length"] == tp2[name]["response_length"] == pp2[name]["response_length"], name
        # A loss that is identically zero would make this comparison vacuous.
        assert any(abs(x) > 1e-8 for x in r["loss"]), (name, r["loss"])
        cfg = load_config(None, tiny_overrides(data, str(tmp_path / "cfg"), **{**variant, "optim.eps": 1e-4}))
        atol, rtol = layout_tolerances(cfg, r)
        for layout, other in (("tp2", tp2), ("pp2", pp2)):
            for step in range(len(r["loss"])):
                got, want = other[name]["loss"][step], r["loss"][step]
                assert abs(got - want) <= atol[step], (name, layout, step, got, want, atol[step])
                got, want = other[name]["grad_norm"][step], r["grad_norm"][step]
                assert abs(got - want) <= rtol[step] * abs(want), (name, layout, step, got, want, rtol[step])


def learn(rank: int, world: int, name: str, data: str, out: str) -> tuple:
    # With the validation hook on (every 7 steps, 4 held-out problems, greedy).
    _train(
        tiny_overrides(
            data,
            out,
            **{
                "loss.name": name,
                "train.steps": 14,
                "optim.lr": 2e-2,
                "rollout.group_size": 8,
                "train.prompts_per_step": 2,
                "parallel.micro_batch_size": 8,
                "rollout.max_new_tokens": 8,
                "train.eval_every": 7,
                "data.eval_path": data,
                "train.eval_samples": 4,
            },
        )
    )
    with open(os.path.join(out, "metrics.jsonl")) as f:
        acc = [json.loads(line)["accuracy"] for line in f]
    with open(os.path.join(out, "validation.jsonl")) as f:
        return acc, [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "egrsd"])
def test_toy_reward_rises(tmp_path, name):
    data = write_data(str(tmp_path / "train.jsonl"))
    acc, val = run_distributed(learn, 1, name, data, str(tmp_path / name), timeout=600)[0]
    first, last = np.mean(acc[:3]), np.mean(acc[-3:])
    assert last > first + 0.15, f"{name}: digit fraction did not rise: {acc}"
    # The validation hook ran at steps 7 and 14 and logged its metrics.
    assert [v["step"] for v in val] == [7, 14] and all(0 <= v["val/accuracy"] <= 1 for v in val)


def kl_runs(rank: int, world: int, data: str, out: str) -> dict:
    rows = {}
    for coef in (0.0, 0.5):
        run_dir = os.path.join(out, f"kl{coef}")
        # OPSD (sampled signal): a reward-free advantage, so step 1 already moves the policy.
        _train(
            tiny_overrides(
                data, run_dir, **{"loss.name": "opsd", "loss.kl_coef": coef, "train.steps": 2, "teacher.mode": "live"}
            )
        )
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows[coef] = [json.loads(line) for line in f]
    return rows


def test_kl_reference_is_the_initial_policy(tmp_path):
    """k3 = exp(lref - lS) - (lref - lS) - 1 with the reference = the INITIAL weights (method.md).

    Step 1: policy == reference, so k3 and its gradient are exactly 0 and the step equals the kl_coef=0 run
    (same update, same step-2 rollouts). Step 2: the policy moved, k3 > 0, and the loss differs from the
    kl_coef=0 run by exactly kl_coef x mean k3 (token_mean, one rank: D = all valid tokens).
    A live teacher (a reference taken from it would be the CURRENT weights, k3 = 0 again).
    """
    data = write_data(str(tmp_path / "train.jsonl"))
    rows = run_distributed(kl_runs, 1, data, str(tmp_path), timeout=600)[0]
    base, kl = rows[0.0], rows[0.5]
    assert "kl_ref_mean" not in base[0] and kl[0]["kl_ref_mean"] == 0.0
    assert kl[0]["loss"] == base[0]["loss"] and kl[0]["grad_norm"] == base[0]["grad_norm"]
    assert kl[1]["accuracy"] == base[1]["accuracy"] and kl[1]["response_length"] == base[1]["response_length"]
    assert base[0]["grad_norm"] > 0 and kl[1]["kl_ref_mean"] > 1e-6, (base[0], kl[1])
    np.testing.assert_allclose(kl[1]["loss"] - base[1]["loss"], 0.5 * kl[1]["kl_ref_mean"], rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------ config errors (no process group)
def test_config_errors_name_the_key(tmp_path):
    from egrsd_megatron.models import resolve_arch
    from egrsd_megatron.trainer.loop import check_config

    data = write_data(str(tmp_path / "train.jsonl"), n=4)

    def check(world, **kw):
        cfg = load_config(None, tiny_overrides(data, str(tmp_path / "o"), **kw))
        return check_config(cfg, world, resolve_arch(cfg.model))

    assert check(2, **{"parallel.tp": 2}) == 1
    with pytest.raises(ConfigError, match="parallel.tp=3 must divide"):
        check(3, **{"parallel.tp": 3})
    with pytest.raises(ConfigError, match="parallel.pp=3 x|parallel.tp=1 x parallel.pp=3"):
        check(2, **{"parallel.pp": 3})
    with pytest.raises(ConfigError, match="parallel.micro_batch_size=3"):
        check(1, **{"parallel.micro_batch_size": 3})
    with pytest.raises(ConfigError, match="train.prompts_per_step=3 must be divisible"):
        check(2, **{"train.prompts_per_step": 3})
    with pytest.raises(ConfigError, match="data.train_path"):
        check(1, **{"data.train_path": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(None, tiny_overrides(data, "o", **{"rollout.group_size": 1, "loss.name": "egrsd"}))
    # OPSD needs no reward groups: one rollout per prompt is fine.
    load_config(None, tiny_overrides(data, "o", **{"rollout.group_size": 1, "loss.name": "opsd"}))


def test_missing_tokenizer_is_a_config_error(tmp_path):
    from egrsd_megatron.trainer.loop import Trainer

    data = write_data(str(tmp_path / "train.jsonl"), n=4)
    cfg = load_config(
        None, tiny_overrides(data, str(tmp_path / "o"), **{"tokenizer.path": str(tmp_path / "no_such_tokenizer")})
    )
    with pytest.raises(ConfigError, match="tokenizer.path"):
        Trainer(cfg)
