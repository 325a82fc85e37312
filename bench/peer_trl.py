#!/usr/bin/env python
"""Ours vs TRL's GRPOTrainer, side by side, and our hf rollout engine vs transformers' `generate`.

Same model (SmolLM2-135M-Instruct, fp32, from our cache: models/smollm2.py), same prompts (our synth one-step
problems, the student prompt through the tokenizer's chat template), group size G rollouts of 1 prompt per
step, at most `--max-new-tokens` new tokens, temperature 1, AdamW at lr 1e-6, TP=1, one process, the same
intra-op thread count (`--threads`). TRL runs with bf16=False and gradient checkpointing off (our trainer
has neither on CPU) and beta=0 (no reference model; our losses run with loss.kl_coef=0 likewise).

Runs alternate in one invocation (ours grpo, ours cl_egrsd, TRL, then again `--repeats` times), each in
its own subprocess (clean memory, peak RSS per run); a step time is the median over steps 2..N of a run
(step 1 warms up), and a case's time is the median over its runs. Generation at equal work: 8 rows x
exactly `--gen-tokens` new tokens (our engine: no stop ids; generate: min_new_tokens = max_new_tokens),
alternating engine / generate `--gen-repeats` times in one process, tokens/s = 8 * N / wall seconds.

Targets (issue 16): our grpo step <= 0.7x TRL's; our cl_egrsd step (teacher pass included) <= 0.9x TRL's
GRPO step; our generation >= 1.0x generate. Needs TRL: run it with `make bench-peers` (its own venv).
    python bench/peer_trl.py [--repeats 3] [--steps 4] [--only gen] [--out bench_peer_trl.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

from bench_common import timed_run_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGETS = {"grpo/trl": ("<=", 0.7), "cl_egrsd/trl": ("<=", 0.9), "engine/generate": (">=", 1.0)}


def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux; the larger of this process and its waited-for children (our rank).
    kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    return kib / 2**20


def _problems(n: int) -> List[Dict[str, str]]:
    from egrsd_megatron.data.synth import generate_problems

    return generate_problems(n, seed=1, min_steps=1, max_steps=1)


# ---------------------------------------------------------------- workers (one subprocess per run)
def _rank_main(rank: int, world: int, overrides: list) -> None:
    from egrsd_megatron.config import load_config
    from egrsd_megatron.trainer.loop import Trainer

    Trainer(load_config(None, overrides)).run()


def worker_ours(a: argparse.Namespace, loss: str, tmp: str) -> dict:
    from egrsd_megatron.models.smollm2 import smollm2_hf_dir
    from egrsd_megatron.testing import run_distributed

    data = os.path.join(tmp, "train.jsonl")
    with open(data, "w") as f:
        for r in _problems(64):
            f.write(json.dumps(r) + "\n")
    out_dir = os.path.join(tmp, f"ours_{loss}")
    over = timed_run_overrides(data, a.steps) + [
        "model.preset=hf",
        f"model.hf_path={smollm2_hf_dir()}",
        "model.init_from=hf",
        "prompt.chat_format=tokenizer",
        "prompt.thinking=false",
        f"loss.name={loss}",
        "loss.kl_coef=0.0",
        f"rollout.group_size={a.group}",
        f"rollout.max_new_tokens={a.max_new_tokens}",
        "rollout.temperature=1.0",
        "train.prompts_per_step=1",
        f"parallel.micro_batch_size={a.group}",
        "parallel.tp=1",
        f"train.out_dir={out_dir}",
    ]
    run_distributed(_rank_main, 1, over, timeout=3600)
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {
        "step_s": [r["time/step"] for r in rows],
        "generate_s": [r["time/generate"] for r in rows],
        "response_tokens": [r["response_length"] for r in rows],
        "peak_rss_gb": _peak_rss_gb(),
    }


def worker_trl(a: argparse.Namespace, tmp: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from egrsd_megatron.config.schema import PromptConfig
    from egrsd_megatron.models.smollm2 import smollm2_hf_dir
    from egrsd_megatron.rewards.final_number import final_number_reward_raw

    torch.set_num_threads(a.threads)
    hf = smollm2_hf_dir()
    template = PromptConfig().student_template  # our student prompt, through the tokenizer's chat template
    rows = [
        {"prompt": [{"role": "user", "content": template.format(problem=r["problem"])}], "answer": r["answer"]}
        for r in _problems(64)
    ]

    def reward(completions, answer, **_):
        return [final_number_reward_raw(c[0]["content"], g) for c, g in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: List[float] = []
            self.t0 = 0.0

        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            self.steps.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(
        output_dir=os.path.join(tmp, "trl"),
        per_device_train_batch_size=a.group,
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        max_steps=a.steps,
        learning_rate=1e-6,
        temperature=1.0,
        beta=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=1,
        dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
        reward_funcs=reward,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(hf),
        callbacks=[timer],
    )
    trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_s": timer.steps, "response_tokens": lens, "peak_rss_gb": _peak_rss_gb()}


def worker_gen(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from egrsd_megatron.config.schema import PromptConfig
    from egrsd_megatron.data.dataset import Problem
    from egrsd_megatron.data.templates import PromptBuilder
    from egrsd_megatron.models.smollm2 import smollm2_hf_dir
    from egrsd_megatron.rollout.base import SamplingParams
    from egrsd_megatron.rollout.hf_engine import HFEngine

    torch.set_num_threads(a.threads)
    hf = smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    r = _problems(1)[0]
    pb = PromptBuilder(tok, PromptConfig(chat_format="tokenizer", thinking=False))
    prompt = pb.student_prompt_ids(Problem(r["problem"], r["solution"], r["answer"], 0, "synth"))
    rows, n = 8, a.gen_tokens
    engine = HFEngine(model, None, max_batch=rows, pad_token_id=int(tok.pad_token_id or 0))
    ids = torch.tensor([prompt] * rows)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=int(tok.pad_token_id or 0))

    def ours(m: int) -> None:
        out = engine.generate([prompt] * rows, SamplingParams(temperature=1.0, max_new_tokens=m, seed=1))
        assert all(len(c.response_ids) == m for c in out)

    def theirs(m: int) -> None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m, **kw)
        assert out.shape[1] == ids.shape[1] + m

    ours(4), theirs(4)  # warm-up
    res: Dict[str, List[float]] = {"engine": [], "generate": []}
    for _ in range(a.gen_repeats):
        for name, fn in (("engine", ours), ("generate", theirs)):
            t = time.perf_counter()
            with torch.no_grad():
                fn(n)
            res[name].append(rows * n / (time.perf_counter() - t))
    import egrsd_megatron.rollout.sampling as sampling  # which checkout ran (before/after comparisons)

    return {"tok_per_s": res, "rows": rows, "new_tokens": n, "prompt_tokens": len(prompt), "code": sampling.__file__}


# ---------------------------------------------------------------- driver
def _spawn(kind: str, a: argparse.Namespace, tmp: str) -> dict:
    out = os.path.join(tmp, f"{kind}_{time.time_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--_result", out, "--_tmp", tmp]
    for k in ("steps", "group", "max_new_tokens", "threads", "gen_tokens", "gen_repeats"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    res = json.load(open(out))
    res["wall_s"] = time.perf_counter() - t
    return res


def _median_after_first(xs: List[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _verdict(key: str, ratio: float) -> str:
    op, tgt = TARGETS[key]
    ok = ratio <= tgt if op == "<=" else ratio >= tgt
    return f"{'met' if ok else 'MISSED'} (target {op} {tgt})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each trainer")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; steps 2.. are timed")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt (1 prompt per step)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of every run")
    ap.add_argument("--gen-tokens", type=int, default=96, help="new tokens per row in the generation benchmark")
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--only", choices=["all", "train", "gen"], default="all")
    ap.add_argument("--out", default="bench_peer_trl.json")
    ap.add_argument("--_worker", choices=["grpo", "cl_egrsd", "trl", "gen"], help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_tmp", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._worker:
        if a._worker == "gen":
            res = worker_gen(a)
        elif a._worker == "trl":
            res = worker_trl(a, a._tmp)
        else:
            res = worker_ours(a, a._worker, tempfile.mkdtemp(dir=a._tmp))
        with open(a._result, "w") as f:
            json.dump(res, f)
        return 0

    tmp = tempfile.mkdtemp(prefix="egrsd_peer_trl_")
    runs: Dict[str, List[dict]] = {"grpo": [], "cl_egrsd": [], "trl": []}
    gen: List[dict] = []
    for rep in range(a.repeats):
        if a.only in ("all", "train"):
            for kind in runs:
                print(f"[repeat {rep + 1}/{a.repeats}] {kind} ...", flush=True)
                runs[kind].append(_spawn(kind, a, tmp))
                r = runs[kind][-1]
                print(f"  step s {[round(x, 2) for x in r['step_s']]}  peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        if a.only in ("all", "gen"):
            print(f"[repeat {rep + 1}/{a.repeats}] generation ...", flush=True)
            gen.append(_spawn("gen", a, tmp))
            print(f"  tok/s {gen[-1]['tok_per_s']}", flush=True)

    summary: Dict[str, dict] = {}
    print()
    if a.only in ("all", "train"):
        step = {k: statistics.median(_median_after_first(r["step_s"]) for r in v) for k, v in runs.items()}
        hdr = f"{'trainer':<16} {'step s (median, steps 2+)':>26} {'resp tok':>9} {'peak RSS GB':>12}"
        print(hdr)
        print("-" * len(hdr))
        for k, v in runs.items():
            toks = statistics.mean(t for r in v for t in r["response_tokens"][1:] or r["response_tokens"])
            rss = max(r["peak_rss_gb"] for r in v)
            name = {"grpo": "ours grpo", "cl_egrsd": "ours cl_egrsd", "trl": "TRL GRPOTrainer"}[k]
            print(f"{name:<16} {step[k]:26.2f} {toks:9.1f} {rss:12.2f}")
            summary[k] = {"step_s": step[k], "response_tokens": toks, "peak_rss_gb": rss}
        summary["grpo/trl"] = {"ratio": step["grpo"] / step["trl"]}
        summary["cl_egrsd/trl"] = {"ratio": step["cl_egrsd"] / step["trl"]}
    if a.only in ("all", "gen"):
        med = {k: statistics.median(x for g in gen for x in g["tok_per_s"][k]) for k in ("engine", "generate")}
        print(
            f"\ngeneration, 8 rows x {a.gen_tokens} new tokens: engine {med['engine']:.1f} tok/s, "
            f"generate {med['generate']:.1f} tok/s"
        )
        summary["generation_tok_per_s"] = med
        summary["engine/generate"] = {"ratio": med["engine"] / med["generate"]}
    print()
    missed = []
    for key in TARGETS:
        if key in summary:
            v = _verdict(key, summary[key]["ratio"])
            summary[key]["verdict"] = v
            print(f"{key:<16} {summary[key]['ratio']:6.3f}  {v}")
            if v.startswith("MISSED"):
                missed.append(key)
    print("targets missed: " + (", ".join(missed) if missed else "none"))
    with open(a.out, "w") as f:
        json.dump(
            {
                "args": {k: v for k, v in vars(a).items() if not k.startswith("_")},
                "runs": runs,
                "generation": gen,
                "summary": summary,
                "missed": missed,
            },
            f,
            indent=2,
        )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
