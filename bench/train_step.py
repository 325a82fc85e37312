#!/usr/bin/env python
"""Seconds per phase of a training step (generation, teacher, student forward/backward, optimizer) and
tokens/s, for a tiny Qwen3 at TP=1 and TP=2 and for SmolLM2-135M-Instruct at TP=1 (CPU, gloo).

Runs the real trainer for `--steps` steps per case and averages the per-step timings logged in its
metrics.jsonl, excluding the first (warm-up) step. Prints a table and writes JSON (--out).
    python bench/train_step.py [--steps 4] [--skip-smollm2] [--out bench_train_step.json]

`--packing` (issue 16): padded (parallel.micro_batch_size) vs packed (parallel.max_tokens_per_micro_batch)
update passes on one fixed batch with a realistic length distribution: most responses short, a spike at the
truncation length (rollout.max_new_tokens), teacher prompts = student prompt + a reference solution. It runs
`trainer.update.run_update` (teacher + student passes of cl_egrsd, optimizer) on a small random Qwen3 at
TP=1 in one gloo process, the two layouts alternating step by step from the same weights, and reports the
tokens each pass computes (padding included), the padding fraction, the median seconds per phase over the
steps after the first, and the loss of each (equal up to fp32 rounding). PP > 1 computes the same packs (each
its own length: Megatron's variable_seq_lengths, trainer/passes.py; tests/distributed/test_packing_trainer.py
counts what each PP=2 stage computes), so the packed padding holds at every PP size. Targets: packed teacher +
student <= 0.75 x padded, padding < 5%.
    python bench/train_step.py --packing [--steps 4] [--out bench_train_step_packing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from bench_common import timed_run_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PHASES = ["time/generate", "time/teacher", "time/student", "time/optimizer", "time/step", "tokens_per_s"]


def _run(rank: int, world: int, overrides: list) -> None:
    from egrsd_megatron.config import load_config
    from egrsd_megatron.trainer.loop import Trainer

    Trainer(load_config(None, overrides)).run()


def case(name: str, world: int, overrides: list, out_dir: str) -> dict:
    from egrsd_megatron.testing import run_distributed

    run_distributed(_run, world, overrides + [f"train.out_dir={out_dir}"], timeout=3600)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    rows = rows[1:] if len(rows) > 1 else rows
    res = {"case": name, "world": world, "steps_averaged": len(rows)}
    for k in PHASES:
        res[k] = sum(r[k] for r in rows) / len(rows)
    res["response_tokens"] = sum(r["response_length"] for r in rows) / len(rows)
    return res


# --packing: the batch (prompts x rollouts, lengths in tokens) and the model; small enough for 2 CPU cores.
PACK_BATCH = dict(prompts=4, group=8, prompt=(48, 96), solution=(48, 128), short=(8, 96), max_new=256, trunc=0.2)
PACK_ARCH = dict(layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=384, vocab=2048)
PACK_MICRO_BATCH = 4  # padded: sequences per micro-batch; packed budget = that many of the longest sequence


def packing_samples(seed: int = 0) -> list:
    """The batch: per prompt, `group` responses; a fraction `trunc` hits max_new (truncated), the rest are
    uniform in `short`. Group advantages from random rewards, per group (as the trainer computes them)."""
    import torch

    from egrsd_megatron.losses import group_advantages
    from egrsd_megatron.trainer.batch import Sample

    b, g = PACK_BATCH, torch.Generator().manual_seed(seed)

    def randint(lo_hi) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))

    def tokens(n: int) -> list:
        return torch.randint(0, PACK_ARCH["vocab"], (n,), generator=g).tolist()

    rewards = torch.rand(b["prompts"] * b["group"], generator=g)
    adv = group_advantages(rewards, b["group"])
    out = []
    for p in range(b["prompts"]):
        sp = tokens(randint(b["prompt"]))
        tp = sp + tokens(randint(b["solution"]))
        for j in range(b["group"]):
            trunc = float(torch.rand(1, generator=g)) < b["trunc"]
            n = b["max_new"] if trunc else randint(b["short"])
            k = p * b["group"] + j
            out.append(Sample(sp, tp, tokens(n), float(adv[k]), float(rewards[k]), trunc, p))
    return out


def _packing_worker(rank: int, world: int, steps: int) -> dict:
    import copy

    from megatron.core import parallel_state as ps

    from egrsd_megatron.config import load_config
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.grads import attach_fp32_grad_accumulators
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import ModelArch, build_model
    from egrsd_megatron.trainer.batch import make_micro_batches, packed_micro_batches, sequence_lengths
    from egrsd_megatron.trainer.optim import build_optimizer, build_scheduler
    from egrsd_megatron.trainer.passes import scoring_for
    from egrsd_megatron.trainer.teacher import frozen_copy
    from egrsd_megatron.trainer.update import local_denominator, run_update

    a = PACK_ARCH
    arch = ModelArch(
        num_layers=a["layers"],
        hidden_size=a["hidden"],
        num_attention_heads=a["heads"],
        num_kv_heads=a["kv_heads"],
        head_dim=a["head_dim"],
        ffn_hidden_size=a["ffn"],
        vocab_size=a["vocab"],
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qk_norm=True,
        tie_word_embeddings=False,
        max_position_embeddings=1024,
        family="qwen3",
    )
    init_distributed(1, 1, seed=1234)
    samples = packing_samples()
    budget = PACK_MICRO_BATCH * max(sequence_lengths(samples))
    cfg = load_config(
        None,
        [
            "loss.name=cl_egrsd",
            f"rollout.group_size={PACK_BATCH['group']}",
            f"train.steps={steps}",
            f"parallel.micro_batch_size={PACK_MICRO_BATCH}",
        ],
    )
    model = build_model(arch, ModelConfig())
    attach_fp32_grad_accumulators([model])
    teacher = frozen_copy(model, lambda: build_model(arch, ModelConfig()))
    initial = copy.deepcopy(model.state_dict())
    layouts = {
        "padded": make_micro_batches(samples, PACK_MICRO_BATCH),
        "packed": packed_micro_batches(samples, budget),
    }
    state = {}
    for name in layouts:
        model.load_state_dict(initial)
        opt = build_optimizer([model], cfg.optim)
        state[name] = (opt, build_scheduler(opt, steps, cfg.optim), copy.deepcopy(model.state_dict()))
    times = {name: {"teacher": [], "student": []} for name in layouts}
    losses = {name: [] for name in layouts}
    for _ in range(steps):
        for name, mbs in layouts.items():  # alternating: a load change on the machine hits both alike
            opt, sched, weights = state[name]
            model.load_state_dict(weights)
            res = run_update(
                cfg,
                model,
                teacher,
                None,
                opt,
                sched,
                mbs,
                denominator=float(local_denominator(samples, cfg.loss.aggregation)),
                scoring=scoring_for(cfg, arch.vocab_size, ps.get_tensor_model_parallel_group()),
                pp_size=1,
                all_reduce_max=lambda v: v,
            )
            state[name] = (opt, sched, copy.deepcopy(model.state_dict()))
            times[name]["teacher"].append(res.timings["time/teacher"])
            times[name]["student"].append(res.timings["time/student"])
            losses[name].append(sum(r.values["loss"] for r in res.records))
    real = sum(sequence_lengths(samples, teacher=False)) + sum(len(s.teacher_prompt) + len(s.response) for s in samples)
    out = {"budget": budget, "sequences": len(samples), "real_tokens": real, "arch": a, "batch": PACK_BATCH}
    for name, mbs in layouts.items():
        computed = sum(mb.computed_tokens("student") + mb.computed_tokens("teacher") for mb in mbs)
        keep = slice(1, None) if steps > 1 else slice(None)  # the first step warms up
        out[name] = {
            "micro_batches": len(mbs),
            "computed_tokens": computed,
            "padding_frac": 1 - real / computed,
            "teacher_s": statistics.median(times[name]["teacher"][keep]),
            "student_s": statistics.median(times[name]["student"][keep]),
            "loss": losses[name],
        }
    return out


def packing_main(steps: int, out_path: str) -> int:
    from egrsd_megatron.testing import run_distributed

    res = run_distributed(_packing_worker, 1, steps, timeout=3600)[0]
    pad, pk = res["padded"], res["packed"]
    hdr = (
        f"{'layout':<8} {'micro-batches':>13} {'tokens computed':>15} {'padding':>8} {'teacher s':>9} {'student s':>9}"
    )
    print(
        f"{res['sequences']} sequences, {res['real_tokens']} real tokens (student + teacher); "
        f"packed budget {res['budget']} tokens per micro-batch"
    )
    print(hdr)
    print("-" * len(hdr))
    for name, r in (("padded", pad), ("packed", pk)):
        print(
            f"{name:<8} {r['micro_batches']:>13} {r['computed_tokens']:>15} {100 * r['padding_frac']:>7.1f}% "
            f"{r['teacher_s']:>9.3f} {r['student_s']:>9.3f}"
        )
    ratio = (pk["teacher_s"] + pk["student_s"]) / (pad["teacher_s"] + pad["student_s"])
    res["ratio_teacher_plus_student"] = ratio
    print(
        f"packed / padded teacher + student time: {ratio:.2f} (target <= 0.75); packed padding "
        f"{100 * pk['padding_frac']:.1f}% (target < 5%; the same packs, so the same padding, at PP > 1)"
    )
    print(f"losses per step, padded {pad['loss']} / packed {pk['loss']}")
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out_path}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--packing", action="store_true", help="padded vs packed update passes (issue 16)")
    ap.add_argument("--out", default=None, help="JSON path (default bench_train_step[_packing].json)")
    args = ap.parse_args()
    if args.packing:
        return packing_main(args.steps, args.out or "bench_train_step_packing.json")
    args.out = args.out or "bench_train_step.json"
    from egrsd_megatron.data.synth import generate_problems
    from egrsd_megatron.testing.tiny import save_tiny_hf_model

    tmp = tempfile.mkdtemp(prefix="egrsd_bench_")
    data = os.path.join(tmp, "train.jsonl")
    with open(data, "w") as f:
        for r in generate_problems(64, seed=1, min_steps=1, max_steps=1):
            f.write(json.dumps(r) + "\n")
    common = timed_run_overrides(data, args.steps)
    tiny = save_tiny_hf_model(os.path.join(tmp, "tiny_hf"))
    tiny_over = common + [
        "model.preset=hf",
        f"model.hf_path={tiny}",
        "model.init_from=hf",
        "prompt.thinking=false",
        "rollout.group_size=8",
        "rollout.max_new_tokens=64",
        "train.prompts_per_step=2",
        "parallel.micro_batch_size=8",
    ]
    results = [
        case("qwen3_tiny TP=1", 1, tiny_over + ["parallel.tp=1"], os.path.join(tmp, "t1")),
        case("qwen3_tiny TP=2", 2, tiny_over + ["parallel.tp=2"], os.path.join(tmp, "t2")),
    ]
    if not args.skip_smollm2:
        from egrsd_megatron.models.smollm2 import smollm2_hf_dir

        hf = smollm2_hf_dir()
        results.append(
            case(
                "SmolLM2-135M TP=1",
                1,
                common
                + [
                    "model.preset=hf",
                    f"model.hf_path={hf}",
                    "model.init_from=hf",
                    "prompt.chat_format=tokenizer",
                    "prompt.thinking=false",
                    "rollout.group_size=8",
                    "rollout.max_new_tokens=128",
                    "train.prompts_per_step=1",
                    "parallel.micro_batch_size=4",
                    "rollout.temperature=0.7",
                ],
                os.path.join(tmp, "s1"),
            )
        )
    hdr = (
        f"{'case':<20} {'gen s':>7} {'teacher s':>9} {'student s':>9} {'optim s':>8} {'step s':>7} {'tok/s':>7} "
        f"{'resp tok':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(
            f"{r['case']:<20} {r['time/generate']:7.2f} {r['time/teacher']:9.2f} {r['time/student']:9.2f} "
            f"{r['time/optimizer']:8.2f} {r['time/step']:7.2f} {r['tokens_per_s']:7.0f} {r['response_tokens']:8.1f}"
        )
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
