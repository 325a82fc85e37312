"""Issue 16: the trainer's passes with packed micro-batches (parallel.max_tokens_per_micro_batch).

One spawn of 2 gloo ranks runs TP=1 (x DP2: the balancer moves sequences between the ranks), TP=2 and PP=2
(each pack its own length: Megatron's variable_seq_lengths exchanges the activation shapes). For every loss
variant of test_trainer.VARIANTS (every loss name, the k3 KL to the reference, OPSD's JSD, two PPO epochs) it
runs `run_update` (teacher, reference and student passes, optimizer) for 2 steps on the same 16 sequences
from the same weights:
padded (parallel.micro_batch_size=4, each DP rank its own 8 sequences), packed under a budget of 64 tokens
and (`layouts_of`) packed under 32 (another assignment to ranks and micro-batches). The per-step losses and
grad norms must agree to the tolerance derived in `tolerances`. The sequences mimic rollouts: many short
responses and a spike at the truncation length, teacher prompts longer than the student's.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import tempfile
from typing import Any, Dict, List

import pytest
import torch

from egrsd_megatron.testing.tolerance import FP32_U, adam_update_change, fp32_rel_tol, transformer_terms
from tests.distributed.test_trainer import VARIANTS, tiny_overrides, write_data

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
GROUPS, G, MAX_NEW = 4, 4, 12  # 16 sequences; responses of at most MAX_NEW tokens
BUDGETS = {"packed": 64, "packed_alt": 32}  # the longest sequence (teacher prompt + response) is 30 tokens
# The second assignment (packed_alt) for every variant at TP=1 x DP2 (where it also moves sequences between
# ranks), for these at TP=2 and PP=2 (cost; tests/unit/test_packed_batches.py covers every loss config).
ALT_EVERYWHERE = ("cl_egrsd", "opsd_jsd")


def layouts_of(name: str, layout: str) -> tuple:
    alt = layout == "tp1pp1" or name in ALT_EVERYWHERE
    return ("padded", "packed", "packed_alt") if alt else ("padded", "packed")


STEPS = 2


def _arch():
    from egrsd_megatron.models import PRESETS

    return PRESETS["qwen3_tiny"]


def make_samples(vocab: int, uses_reward: bool) -> List[Any]:
    """The step's global samples (the same on every rank), with group advantages computed per group first."""
    from egrsd_megatron.losses import group_advantages
    from egrsd_megatron.trainer.batch import Sample

    g = torch.Generator().manual_seed(7)
    rewards = torch.rand(GROUPS * G, generator=g)
    adv = group_advantages(rewards, G) if uses_reward else torch.zeros_like(rewards)
    out = []
    for p in range(GROUPS):
        sp = torch.randint(0, vocab, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        tp = sp + torch.randint(0, vocab, (int(torch.randint(6, 11, (1,), generator=g)),), generator=g).tolist()
        for j in range(G):
            # 3 in 4 short (1-4 tokens), the rest truncated at MAX_NEW: the shape of real rollout lengths
            n = MAX_NEW if j == G - 1 else int(torch.randint(1, 5, (1,), generator=g))
            resp = torch.randint(0, vocab, (n,), generator=g).tolist()
            k = p * G + j
            out.append(Sample(sp, tp, resp, float(adv[k]), float(rewards[k]), n == MAX_NEW, p))
    return out


def _config(hf_dir: str, variant: dict, tp: int, pp: int):
    from egrsd_megatron.config import load_config

    base = {
        "model.preset": "hf",
        "model.hf_path": hf_dir,
        "rollout.group_size": G,
        "train.steps": STEPS,
        "parallel.tp": tp,
        "parallel.pp": pp,
        "parallel.micro_batch_size": 4,
        "optim.lr": 1e-3,
        "optim.eps": 1e-4,  # see test_trainer.run_all_losses: keeps rounding noise out of Adam's step 2
        **variant,
    }
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _step_metrics(records) -> Dict[str, float]:
    """The step's metrics as the trainer logs them: records of every rank's last stage (TP rank 0), reduced."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from egrsd_megatron.trainer.metrics import reduce_metrics

    mine = records if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 else None
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return reduce_metrics([g for g in gathered if g is not None])


def run_variant(
    cfg, model, initial, build, samples, dp_rank: int, dp: int, layout: str, local_norm: bool = False
) -> dict:
    """2 steps of `run_update` from `initial` with `layout`'s micro-batches. `local_norm`: the negative
    control, each micro-batch's loss divided by its own token count (policy_loss's default) instead of the
    global one: the classic packing bug, whose loss depends on the grouping."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from egrsd_megatron.trainer.batch import make_micro_batches, packed_micro_batches
    from egrsd_megatron.trainer.optim import build_optimizer, build_scheduler
    from egrsd_megatron.trainer.passes import scoring_for
    from egrsd_megatron.trainer.teacher import frozen_copy
    from egrsd_megatron.trainer.update import local_denominator, run_update, teacher_pass_needed

    model.load_state_dict(initial)
    teacher = model if cfg.teacher.mode == "live" else frozen_copy(model, build)
    reference = None
    if cfg.loss.kl_coef > 0:
        reference = teacher if cfg.teacher.mode == "frozen" else frozen_copy(model, build)
    opt = build_optimizer([model], cfg.optim)
    sched = build_scheduler(opt, cfg.train.steps, cfg.optim)
    pp = ps.get_pipeline_model_parallel_world_size()
    if layout == "padded":
        per = len(samples) // dp
        mbs = make_micro_batches(samples[dp_rank * per : (dp_rank + 1) * per], cfg.parallel.micro_batch_size)
    else:
        budget = BUDGETS[layout]
        with_teacher = teacher_pass_needed(cfg.loss, cfg.teacher.log_entropy)
        mbs = packed_micro_batches(samples, budget, dp_rank, dp, teacher=with_teacher)
    scoring = scoring_for(cfg, _arch().vocab_size, ps.get_tensor_model_parallel_group())
    # What the student model really computed: the [s, b, H] input of its first local layer, every forward, on
    # every stage (a later stage's input is what the p2p exchange delivered).
    forward_tokens: List[int] = []

    def count(_module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        forward_tokens.append(int(hidden.shape[0] * hidden.shape[1]))

    hook = model.decoder.layers[0].register_forward_pre_hook(count, with_kwargs=True)

    def all_reduce_max(v: float) -> float:
        t = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    out: Dict[str, Any] = {"loss": [], "grad_norm": [], "lr": []}
    try:
        for _ in range(STEPS):
            out["lr"].append(sched.get_last_lr()[0])
            res = run_update(
                cfg,
                model,
                teacher,
                reference,
                opt,
                sched,
                mbs,
                denominator=None if local_norm else float(local_denominator(samples, cfg.loss.aggregation)),
                scoring=scoring,
                pp_size=pp,
                all_reduce_max=all_reduce_max,
            )
            assert not res.skipped
            logged = _step_metrics(res.records)
            out["loss"].append(logged["loss"])
            out["pass_tokens"] = {k: logged[k] for k in logged if k.startswith(("computed_tokens_", "padding_frac_"))}
            out["grad_norm"].append(res.grad_norm)
    finally:
        hook.remove()
    stages: List[Any] = [None] * pp
    dist.all_gather_object(stages, forward_tokens, group=ps.get_pipeline_model_parallel_group())
    out["forward_tokens_by_stage"] = stages
    out["student_real_tokens"] = [mb.real_tokens("student") for mb in mbs]
    out["micro_batches"] = len(mbs)
    out["sequences_per_mb"] = [int(mb.mask.shape[0]) for mb in mbs]
    out["computed_tokens"] = sum(mb.computed_tokens("student") for mb in mbs)
    out["student_lengths"] = sorted({int(mb.student_ids.shape[1]) for mb in mbs})
    return out


def worker(
    rank: int, world: int, hf_dir: str, layouts=tuple(LAYOUTS), names=tuple(VARIANTS), trainer_data=None
) -> dict:
    from egrsd_megatron.checkpoint.hf_mapping import load_hf_weights
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.grads import attach_fp32_grad_accumulators
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import ModelArch, build_model

    arch = ModelArch.from_hf_config(hf_dir)
    out: Dict[str, dict] = {}
    for tp, pp in layouts:
        info = init_distributed(tp=tp, pp=pp, seed=1234)
        dp = world // (tp * pp)
        model = build_model(arch, ModelConfig())
        load_hf_weights(model, arch, hf_dir)
        attach_fp32_grad_accumulators([model])
        initial = copy.deepcopy(model.state_dict())

        def build():
            return build_model(arch, ModelConfig())

        for name in names:
            cfg = _config(hf_dir, VARIANTS[name], tp, pp)
            samples = make_samples(arch.vocab_size, cfg.loss.spec.uses_reward)
            for layout in layouts_of(name, f"tp{tp}pp{pp}"):
                out[f"tp{tp}pp{pp}/{name}/{layout}/dp{info.dp_rank}"] = run_variant(
                    cfg, model, initial, build, samples, info.dp_rank, dp, layout
                )
            if name == "cl_egrsd":
                out[f"tp{tp}pp{pp}/{name}/local_norm/dp{info.dp_rank}"] = run_variant(
                    cfg, model, initial, build, samples, info.dp_rank, dp, "packed", local_norm=True
                )
    if trainer_data is not None:  # the loop's own wiring (Trainer._micro_batches): TP=1 x DP2
        for layout, extra in (("padded", {}), ("packed", {"parallel.max_tokens_per_micro_batch": 1024})):
            out_dir = os.path.join(os.path.dirname(trainer_data), f"trainer_{layout}")
            out[f"trainer/{layout}"] = train_rows(tiny_overrides(trainer_data, out_dir, **{**TRAINER_RUN, **extra}))
    return out


TRAINER_RUN = {"loss.name": "cl_egrsd", "optim.eps": 1e-4}


def train_rows(overrides: list) -> dict:
    """Run the Trainer; its metrics.jsonl rows by key (rank 0 writes them; every rank reads them after)."""
    import json

    import torch.distributed as dist

    from egrsd_megatron.config import load_config
    from egrsd_megatron.trainer.loop import Trainer

    cfg = load_config(None, overrides)
    assert Trainer(cfg).run() == 0
    dist.barrier()
    with open(os.path.join(cfg.train.out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = ("loss", "grad_norm", "lr", "response_length", "accuracy", *PASS_TOKEN_KEYS)
    return {k: [r[k] for r in rows] for k in keys}


PASS_TOKEN_KEYS = tuple(f"{m}_{side}" for m in ("computed_tokens", "padding_frac") for side in ("student", "teacher"))


@functools.lru_cache(maxsize=1)
def results() -> dict:
    from egrsd_megatron.testing.spawn import run_distributed
    from egrsd_megatron.testing.tiny import save_random_hf_model, save_tiny_hf_model

    root = tempfile.mkdtemp(prefix="egrsd_packing_trainer_")
    hf_dir = save_random_hf_model(_arch(), os.path.join(root, "hf"), seed=3, randomize_norms=True)
    data = write_data(os.path.join(root, "train.jsonl"))
    save_tiny_hf_model(os.path.join(root, "tiny_hf"))  # tiny_overrides' model, written once before the spawn
    merged: dict = {}
    for per_rank in run_distributed(worker, 2, hf_dir, tuple(LAYOUTS), tuple(VARIANTS), data, timeout=900):
        merged.update(per_rank)  # keys carry the DP rank; TP/PP peers of one DP rank report the same numbers
    return merged


def tolerances(cfg, ref: dict, n_tok: int, max_len: int, computed: int) -> tuple:
    """(loss atol per step, grad-norm rtol per step) between padded and packed runs, from the arithmetic.

    Packed and padded compute the same per-sequence math; what differs is the ORDER of fp32 sums: every
    GEMM of the forward chain runs on another row count (T pack rows vs b x L padded rows, so other
    blocking), the attention's softmax and probs x V sum over a segment instead of a padded row with
    zero-probability keys, and the step's loss and weight gradients sum the tokens grouped by other
    micro-batches. token_stats' vocabulary reductions are the same (the same [n, R, V_local] layout per
    token). So, in test_trainer.layout_tolerances' random-walk model with 4 sigma:
    - Per-token log-prob: K = transformer_terms(arch, max_len) reordered roundings along its chain, at the
      magnitude of log V (activations are RMS-normalised; logits and log-probs are below log V here):
      sigma_lp = sqrt(2K/3) u log V (fp32_rel_tol / 4 x log V).
    - Loss: a token mean over N tokens of terms whose error is W sigma_lp, with test_trainer's W (OPSD
      sqrt(2); reward losses sqrt(G - 1) (1 + eps_hi) ((1 + eps_w) sqrt(2) + (1 - g_min) / tau)):
      atol = 4 W sigma_lp / sqrt(N).
    - Grad norm: every weight-gradient entry runs the backward chain and sums over the `computed` token
      positions: rtol = fp32_rel_tol(transformer_terms(arch, max_len, computed, backward=True)).
    - Step 2 adds what step 1's update carries over (testing.tolerance.adam_update_change, as in
      layout_tolerances), and doubles the grad-norm rtol.
    """
    arch = _arch()
    sigma_lp = fp32_rel_tol(transformer_terms(arch, max_len)) / 4 * math.log(arch.vocab_size)
    if cfg.loss.name == "opsd":
        w = math.sqrt(2)
    else:
        lc = cfg.loss
        w = (
            math.sqrt(G - 1)
            * (1 + lc.clip.eps_hi)
            * ((1 + lc.ratio.eps_w) * math.sqrt(2) + (1 - lc.gate.g_min) / lc.gate.tau)
        )
    atol1 = 4 * w * sigma_lp / math.sqrt(n_tok)
    rtol1 = fp32_rel_tol(transformer_terms(arch, max_len, tokens=computed, backward=True))
    carried = adam_update_change(
        ref["lr"][0], cfg.optim.eps, rtol1 * min(ref["grad_norm"][0], cfg.optim.clip_grad or math.inf)
    )
    atol = [atol1] + [atol1 + carried * g for g in ref["grad_norm"][1:]]
    rtol = [rtol1] + [2 * rtol1] * (STEPS - 1)
    assert FP32_U * n_tok < 1  # first-order error model
    return atol, rtol


def _check_layout(layout: str) -> Dict[str, float]:
    res = results()
    arch = _arch()
    worst: Dict[str, float] = {}
    for name, variant in VARIANTS.items():
        cfg = _config("unused", variant, 1, 1)
        samples = make_samples(arch.vocab_size, cfg.loss.spec.uses_reward)
        n_tok = sum(len(s.response) for s in samples)
        max_len = max(len(s.teacher_prompt) + len(s.response) for s in samples)
        ref = res[f"{layout}/{name}/padded/dp0"]
        assert any(abs(x) > 1e-6 for x in ref["loss"]), (name, ref["loss"])  # a zero loss would prove nothing
        assert all(g > 1e-6 for g in ref["grad_norm"]), (name, ref["grad_norm"])
        computed = max(r["computed_tokens"] for k, r in res.items() if k.startswith(f"{layout}/{name}/"))
        atol, rtol = tolerances(cfg, ref, n_tok, max_len, computed)
        for other in layouts_of(name, layout)[1:]:
            got = res[f"{layout}/{name}/{other}/dp0"]
            for step in range(STEPS):
                d_loss = abs(got["loss"][step] - ref["loss"][step])
                d_norm = abs(got["grad_norm"][step] - ref["grad_norm"][step]) / ref["grad_norm"][step]
                assert d_loss <= atol[step], (name, other, step, got["loss"][step], ref["loss"][step], atol[step])
                assert d_norm <= rtol[step], (name, other, step, got["grad_norm"][step], ref["grad_norm"][step])
                worst[f"loss/{step}"] = max(worst.get(f"loss/{step}", 0.0), d_loss / atol[step])
                worst[f"grad_norm/{step}"] = max(worst.get(f"grad_norm/{step}", 0.0), d_norm / rtol[step])
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_packed_losses_and_grad_norms_equal_padded(layout):
    """Every loss variant, 2 steps: packed (two different assignments) = padded, per-step loss and grad norm."""
    worst = _check_layout(layout)
    print(layout, "largest |difference| / tolerance:", {k: f"{v:.2g}" for k, v in worst.items()})


@pytest.mark.slow
def test_packing_really_packs_and_assignments_differ():
    """The comparison is not vacuous: packs hold several sequences, the two budgets give other assignments,
    and at DP2 the balancer splits the 16 sequences over both ranks."""
    res = results()
    for layout in (f"tp{tp}pp{pp}" for tp, pp in LAYOUTS):
        main, alt = res[f"{layout}/cl_egrsd/packed/dp0"], res[f"{layout}/cl_egrsd/packed_alt/dp0"]
        assert max(main["sequences_per_mb"]) >= 3, (layout, main["sequences_per_mb"])
        assert main["micro_batches"] < alt["micro_batches"], (layout, main, alt)
    dp = [res[f"tp1pp1/cl_egrsd/packed/dp{r}"]["sequences_per_mb"] for r in (0, 1)]
    assert sum(map(sum, dp)) == GROUPS * G and all(dp), dp
    # No padding at PP=2 (variable_seq_lengths) as at PP=1: packs of several lengths, and what each stage's
    # first layer computed, forward by forward (the student pass of each step; cl_egrsd's teacher is a frozen
    # copy), is exactly each pack's real tokens: the sum of its sequence lengths.
    for layout in ("tp1pp1", "tp1pp2"):
        got = res[f"{layout}/cl_egrsd/packed/dp0"]
        assert len(got["student_lengths"]) > 1, (layout, got["student_lengths"])
        assert got["computed_tokens"] == sum(got["student_real_tokens"]), layout
        assert len(got["forward_tokens_by_stage"]) == int(layout[-1])
        for stage, seen in enumerate(got["forward_tokens_by_stage"]):
            assert seen == got["student_real_tokens"] * STEPS, (layout, stage, seen, got["student_real_tokens"])
        # The logged per-pass metrics of the step (batch.pass_token_metrics, reduced): packed 0 padding and
        # the sequences' own tokens; padded (micro_batch_size=4, every row as long as the batch's longest)
        # more positions, of which computed x (1 - padding_frac) are the same real tokens.
        pad, pk = res[f"{layout}/cl_egrsd/padded/dp0"]["pass_tokens"], got["pass_tokens"]
        samples, dp = make_samples(_arch().vocab_size, True), 2 if layout == "tp1pp1" else 1
        per = len(samples) // dp
        for side in ("student", "teacher"):
            lengths = [len(getattr(s, f"{side}_prompt")) + len(s.response) for s in samples]
            padded = sum(per * max(lengths[r * per : (r + 1) * per]) for r in range(dp))  # each rank's longest
            assert pk[f"computed_tokens_{side}"] == sum(lengths) and pk[f"padding_frac_{side}"] == 0.0, (layout, pk)
            assert pad[f"computed_tokens_{side}"] == padded and pad[f"padding_frac_{side}"] > 0, (layout, pad)
            real = pad[f"computed_tokens_{side}"] * (1 - pad[f"padding_frac_{side}"])
            assert real == pytest.approx(sum(lengths), rel=1e-12), (layout, side, pad, pk)


@pytest.mark.slow
def test_negative_control_local_normalisation_is_caught():
    """Dividing each micro-batch's loss by its own token count makes the loss depend on the grouping: the
    test's tolerance must catch it by far (x100)."""
    res = results()
    cfg = _config("unused", VARIANTS["cl_egrsd"], 1, 1)
    samples = make_samples(_arch().vocab_size, True)
    ref = res["tp1pp1/cl_egrsd/padded/dp0"]
    atol, _ = tolerances(cfg, ref, sum(len(s.response) for s in samples), 30, ref["computed_tokens"])
    wrong = res["tp1pp1/cl_egrsd/local_norm/dp0"]
    assert abs(wrong["loss"][0] - ref["loss"][0]) > 100 * atol[0], (wrong["loss"], ref["loss"], atol)


@pytest.mark.slow
def test_trainer_packed_equals_padded():
    """The training loop with parallel.max_tokens_per_micro_batch (samples gathered over DP2 and balanced)
    logs the same losses and grad norms as with micro_batch_size, to `tolerances` of its own batch."""
    res = results()
    ref, got = res["trainer/padded"], res["trainer/packed"]
    # Same weights and per-rollout seeds: the same rollouts (the comparison is of the update alone).
    assert ref["response_length"] == got["response_length"] and ref["accuracy"] == got["accuracy"]
    cfg = _config("unused", {**VARIANTS["cl_egrsd"], **TRAINER_RUN}, 1, 1)
    n_tok = min(2 * G * r for r in ref["response_length"])  # train.prompts_per_step=2 x G x the mean length
    max_len = _arch().max_position_embeddings  # a bound on every sequence (the step's own lengths are not logged)
    atol, rtol = tolerances(cfg, ref, int(n_tok), max_len, 2 * G * max_len)
    assert any(abs(x) > 1e-6 for x in ref["loss"]), ref
    for step in range(STEPS):
        assert abs(got["loss"][step] - ref["loss"][step]) <= atol[step], (step, got, ref, atol)
        assert abs(got["grad_norm"][step] - ref["grad_norm"][step]) <= rtol[step] * ref["grad_norm"][step]
    # The logged per-pass token counts (batch.pass_token_metrics): packed at PP=1 computes no padding; the
    # padded run computes at least as many positions, of which the real ones, computed x (1 - padding_frac),
    # are the packed run's (the same rollouts; this run's rollouts may all have one length, padding then 0
    # on both sides). Float64 arithmetic on integers < 2^20: equal to ~1e-12 relative.
    for side in ("student", "teacher"):
        for step in range(STEPS):
            c_pad, f_pad = ref[f"computed_tokens_{side}"][step], ref[f"padding_frac_{side}"][step]
            c_pk, f_pk = got[f"computed_tokens_{side}"][step], got[f"padding_frac_{side}"][step]
            assert f_pk == 0.0 and c_pk > 0 and c_pad >= c_pk, (side, step, ref, got)
            assert c_pad * (1 - f_pad) == pytest.approx(c_pk, rel=1e-12), (side, step, ref, got)
