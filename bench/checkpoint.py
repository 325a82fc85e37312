#!/usr/bin/env python
"""Training-checkpoint cost (issue 18): the save time the training loop sees, synchronous vs asynchronous, the
load time and the size on disk, for a Qwen3-0.6B-shaped model with its AdamW state, in both formats.

One gloo process (TP=1, PP=1, CPU): the model of `--preset` (models/presets.py; default qwen3_0.6b, 596M
parameters, fp32) and torch AdamW whose exp_avg / exp_avg_sq are filled by one step on random gradients (then
freed). Each case saves a full training checkpoint with checkpoint/train_state.py (model, optimizer,
scheduler, RNG, trainer state, manifest) into its own folder, `--repeats` times (median reported):
- torch            the per-rank layout, synchronous (save_train_state returns with the folder complete);
- torch_dist       dist_checkpointing, synchronous;
- torch_dist async train.async_save: `call` is what the loop waits for in the save call (small files,
                   planning, staging, fork of the writer); `write` is the background time from the call's
                   return until the writer process has exited; `finalize` is what the loop waits for at the
                   next save or exit (AsyncCheckpointSaver.wait: .metadata, manifest hashing, rename, latest).
Then load_train_state reads it back into the same model and optimizer (from the page cache: the folder was
just written) and the folder's bytes are counted; folders are deleted after each case (`--keep` keeps them).
Target (issue 18): the loop-visible async save time <= 0.2 x the synchronous torch_dist save. Both readings
are printed: the save call alone, and call + finalize (everything the loop waits for, in two places).

    python bench/checkpoint.py [--preset qwen3_0.6b] [--repeats 1] [--dir /tmp] [--out bench_checkpoint.json]
    python bench/checkpoint.py --preset qwen3_tiny     # a quick run
A 0.6B checkpoint with AdamW is ~7 GB: the script needs ~2x that on disk in --dir (one case at a time) and
~8 GB of memory (no step runs while the writer works, so no copy-on-write pages are added).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = [("torch", "torch", False), ("torch_dist", "torch_dist", False), ("torch_dist async", "torch_dist", True)]
TARGET = 0.2


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _worker(rank: int, world: int, preset: str, repeats: int, work_dir: str, keep: bool) -> dict:  # noqa: ARG001
    import torch

    from egrsd_megatron.checkpoint.async_save import AsyncCheckpointSaver
    from egrsd_megatron.checkpoint.train_state import load_train_state, save_train_state
    from egrsd_megatron.config.schema import ModelConfig, OptimConfig
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import PRESETS, build_model
    from egrsd_megatron.trainer.optim import build_optimizer, build_scheduler

    init_distributed(1, 1, seed=0)
    # Warm-up, untimed: one save of every case with the tiny model pays the one-time costs of the process (lazy
    # imports of torch.distributed.checkpoint, dist_checkpointing's writer-results queue: a Manager process),
    # which would otherwise land on whichever case runs first (~3-5 s here).
    t0 = time.perf_counter()
    tiny = build_model(PRESETS["qwen3_tiny"], ModelConfig())
    tiny_opt = build_optimizer([tiny], OptimConfig())
    tiny_sched = build_scheduler(tiny_opt, 100, OptimConfig())
    for name, fmt, is_async in CASES:
        saver = AsyncCheckpointSaver() if is_async else None
        warm = os.path.join(work_dir, "warmup_" + name.replace(" ", "_"))
        save_train_state(warm, 1, tiny, PRESETS["qwen3_tiny"], tiny_opt, tiny_sched, {}, 1, fmt=fmt, async_saver=saver)
        if saver is not None:
            saver.wait()
        shutil.rmtree(warm, ignore_errors=True)
    del tiny, tiny_opt, tiny_sched
    warmup_s = time.perf_counter() - t0
    arch = PRESETS[preset]
    t0 = time.perf_counter()
    model = build_model(arch, ModelConfig())
    opt = build_optimizer([model], OptimConfig())
    sched = build_scheduler(opt, 100, OptimConfig())
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():  # one step fills exp_avg / exp_avg_sq; the gradients are freed after it
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt.step()
    sched.step()
    for p in model.parameters():
        p.grad = None
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )
    setup_s = time.perf_counter() - t0
    trainer_state = {"step": 1, "note": "bench"}
    out = {"preset": preset, "parameters": n_params, "state_bytes": state_bytes, "cases": []}
    out.update(setup_s=setup_s, warmup_s=warmup_s)
    for name, fmt, is_async in CASES:
        root = os.path.join(work_dir, name.replace(" ", "_"))
        times = {"call": [], "write": [], "finalize": [], "load": []}
        size = 0
        saver = AsyncCheckpointSaver() if is_async else None
        for r in range(repeats):
            step = r + 1
            t = time.perf_counter()
            folder = save_train_state(
                root, step, model, arch, opt, sched, trainer_state, keep_last=1, fmt=fmt, async_saver=saver
            )
            times["call"].append(time.perf_counter() - t)
            if saver is not None:
                t = time.perf_counter()
                while saver.writer_running():
                    time.sleep(0.01)
                times["write"].append(time.perf_counter() - t)
                t = time.perf_counter()
                saver.wait()
                times["finalize"].append(time.perf_counter() - t)
            size = _folder_bytes(folder)
            t = time.perf_counter()
            load_train_state(folder, model, arch, opt, sched)
            times["load"].append(time.perf_counter() - t)
        res = {"case": name, "format": fmt, "async": is_async, "bytes": size, "repeats": repeats}
        res.update({f"{k}_s": statistics.median(v) for k, v in times.items() if v})
        res["each_s"] = times
        res["loop_s"] = res["call_s"] + res.get("finalize_s", 0.0)
        out["cases"].append(res)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen3_0.6b", help="model shape from models/presets.py (qwen3_tiny: quick)")
    ap.add_argument("--repeats", type=int, default=1, help="saves per case (median reported)")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete after each case)")
    ap.add_argument("--out", default="bench_checkpoint.json")
    args = ap.parse_args()
    from egrsd_megatron.testing import run_distributed

    work = tempfile.mkdtemp(prefix="egrsd_bench_ckpt_", dir=args.dir)
    try:
        # daemon=False: the torch_dist writer forks processes of its own (testing/spawn.py).
        res = run_distributed(_worker, 1, args.preset, args.repeats, work, args.keep, timeout=7200, daemon=False)[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["load_average"] = os.getloadavg()
    print(
        f"{res['preset']}: {res['parameters'] / 1e6:.0f}M parameters, model + AdamW state "
        f"{res['state_bytes'] / 2**30:.2f} GiB; 1 process (TP=1), {args.repeats} save(s) per case; "
        f"load average {res['load_average'][0]:.2f}"
    )
    hdr = (
        f"{'case':<17} {'save call s':>11} {'write s':>8} {'finalize s':>10} {'loop total s':>12} {'load s':>7} "
        f"{'disk GiB':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for c in res["cases"]:
        bg = f"{c['write_s']:8.2f}" if "write_s" in c else f"{'-':>8}"
        fin = f"{c['finalize_s']:10.2f}" if "finalize_s" in c else f"{'-':>10}"
        print(
            f"{c['case']:<17} {c['call_s']:11.2f} {bg} {fin} {c['loop_s']:12.2f} {c['load_s']:7.2f} "
            f"{c['bytes'] / 2**30:8.2f}"
        )
    sync = next(c for c in res["cases"] if c["format"] == "torch_dist" and not c["async"])
    asy = next(c for c in res["cases"] if c["async"])
    res["ratio_call"] = asy["call_s"] / sync["loop_s"]
    res["ratio_loop"] = asy["loop_s"] / sync["loop_s"]
    for key, what in (("ratio_call", "the save call"), ("ratio_loop", "save call + finalize")):
        met = "MET" if res[key] <= TARGET else "NOT MET"
        print(f"async / sync torch_dist, {what}: {res[key]:.3f} (target <= {TARGET}): {met}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
