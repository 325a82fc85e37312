#!/usr/bin/env python
"""Seconds per phase of a training step (generation, teacher, student forward/backward, optimizer) and
tokens/s, for a tiny Qwen3 at TP=1 and TP=2 and for SmolLM2-135M-Instruct at TP=1 (CPU, gloo).

Runs the real trainer for `--steps` steps per case and averages the per-step timings logged in its
metrics.jsonl, excluding the first (warm-up) step. Prints a table and writes JSON (--out).
    python bench/train_step.py [--steps 4] [--skip-smollm2] [--out bench_train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--out", default="bench_train_step.json")
    args = ap.parse_args()
    from egrsd_megatron.data.synth import generate_problems
    from egrsd_megatron.testing.tiny import save_tiny_hf_model

    tmp = tempfile.mkdtemp(prefix="egrsd_bench_")
    data = os.path.join(tmp, "train.jsonl")
    with open(data, "w") as f:
        for r in generate_problems(64, seed=1, min_steps=1, max_steps=1):
            f.write(json.dumps(r) + "\n")
    common = [
        f"data.train_path={data}",
        f"train.steps={args.steps}",
        "train.save_every=0",
        "train.sample_every=0",
        "train.resume=none",
        "logging.tensorboard=false",
        "reward.name=final_number",
        "reward.num_workers=1",
    ]
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
