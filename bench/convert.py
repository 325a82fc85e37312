#!/usr/bin/env python
"""Benchmark: convert a random Qwen3-0.6B-sized checkpoint HF -> Megatron -> HF; wall time and peak RSS.

Each step runs in a fresh subprocess whose own peak RSS (ru_maxrss) is recorded. Reported:
- peak RSS / checkpoint size (target <= 1.5x; the process's import baseline included, and also shown
  with the import baseline of an idle process that imported the same modules subtracted),
- wall time, as a ratio to a naive baseline measured in the same run: safetensors load_file of the whole
  checkpoint + save_file (what a non-streaming converter does at least; it holds the model once).
Usage: python bench/convert.py [--preset qwen3_0.6b] [--dtype bf16|fp32] [--tp 1 --pp 1] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import torch, safetensors.torch
from egrsd_megatron.checkpoint import convert
step, a, b, tp, pp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
if step == "idle":
    pass
elif step == "naive_copy":
    import glob
    os.makedirs(b)
    for f in sorted(glob.glob(os.path.join(a, "*.safetensors"))):
        sd = safetensors.torch.load_file(f)   # whole shard in memory
        safetensors.torch.save_file(sd, os.path.join(b, os.path.basename(f)))
        del sd
elif step == "hf_to_megatron":
    convert.hf_to_megatron(a, b, tp=tp, pp=pp)
elif step == "megatron_to_hf":
    convert.megatron_to_hf(a, b)
wall = time.perf_counter() - t
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's RSS inherited at fork)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({{"wall_s": wall, "peak_rss_bytes": hwm}}))
"""


def write_random_checkpoint(arch, out_dir: str, dtype, shard_bytes: int = 1 << 30) -> int:
    """A random HF checkpoint written tensor by tensor (never the whole model in memory); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from egrsd_megatron.checkpoint.layout import hf_shapes

    os.makedirs(out_dir)
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(arch)
    shards, cur, size, total = [], {}, 0, 0
    for n, s in shapes.items():
        t = (torch.randn(s, generator=g) * 0.02).to(dtype)
        if cur and size + t.numel() * t.element_size() > shard_bytes:
            shards.append(cur)
            save_file(cur, os.path.join(out_dir, f"part{len(shards)}"), metadata={"format": "pt"})
            cur, size = {}, 0
        cur[n] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
    shards.append(cur)
    save_file(cur, os.path.join(out_dir, f"part{len(shards)}"), metadata={"format": "pt"})
    n = len(shards)
    weight_map = {}
    for i, sd in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(out_dir, f"part{i + 1}"), os.path.join(out_dir, name))
        weight_map.update({k: name for k in sd})
    shards.clear()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(arch.to_hf_config(dtype=str(dtype).replace("torch.", "")), f)
    return total


def run_step(step: str, a: str, b: str, tp: int, pp: int) -> dict:
    code = _CHILD.format(root=ROOT)
    r = subprocess.run(
        [sys.executable, "-c", code, step, a, b, str(tp), str(pp)],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    if r.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3_0.6b")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.models import resolve_arch

    arch = resolve_arch(ModelConfig(preset=args.preset))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    size_gib = arch.num_params() * (2 if args.dtype == "bf16" else 4) / 1024**3
    if size_gib > 3.0:
        # Shared machine rule: keep each process under ~6 GiB; a 1.5x peak of > 3 GiB would break it.
        print(f"skip: {args.preset} {args.dtype} is {size_gib:.1f} GiB; a 1.5x peak would exceed the 6 GiB budget")
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf = os.path.join(tmp, "hf")
        t = time.perf_counter()
        nbytes = write_random_checkpoint(arch, hf, dtype)
        gen_s = time.perf_counter() - t
        rows = {
            "idle_import": run_step("idle", hf, "", 1, 1),
            "naive_copy (baseline)": run_step("naive_copy", hf, os.path.join(tmp, "copy"), 1, 1),
            f"hf_to_megatron tp{args.tp} pp{args.pp}": run_step(
                "hf_to_megatron", hf, os.path.join(tmp, "meg"), args.tp, args.pp
            ),
            "megatron_to_hf": run_step("megatron_to_hf", os.path.join(tmp, "meg"), os.path.join(tmp, "hf2"), 1, 1),
        }
        # the round trip must be bit-identical: compare tensor by tensor
        from egrsd_megatron.checkpoint.hf_io import HFSource

        s1, s2 = HFSource(hf), HFSource(os.path.join(tmp, "hf2"))
        identical = all(torch.equal(s1.fetch([n])[0], s2.fetch([n])[0]) for n in s1.file_of)
    base_rss = rows["idle_import"]["peak_rss_bytes"]
    base_wall = rows["naive_copy (baseline)"]["wall_s"]
    print(
        f"checkpoint: {args.preset} {args.dtype}, {nbytes / 1024**3:.2f} GiB ({arch.num_params() / 1e6:.0f}M params; "
        f"generated in {gen_s:.0f} s); round trip bit-identical: {identical}"
    )
    print(
        f"{'step':34s} {'wall s':>8s} {'x naive':>8s} {'peak RSS GiB':>13s} {'RSS/ckpt':>9s} {'(RSS-idle)/ckpt':>16s}"
    )
    out_rows = []
    for name, r in rows.items():
        rss = r["peak_rss_bytes"]
        row = {
            "step": name,
            "wall_s": r["wall_s"],
            "wall_vs_naive": r["wall_s"] / base_wall,
            "peak_rss_gib": rss / 1024**3,
            "rss_over_ckpt": rss / nbytes,
            "rss_minus_idle_over_ckpt": (rss - base_rss) / nbytes,
        }
        out_rows.append(row)
        print(
            f"{name:34s} {row['wall_s']:8.1f} {row['wall_vs_naive']:8.2f} {row['peak_rss_gib']:13.2f} "
            f"{row['rss_over_ckpt']:9.2f} {row['rss_minus_idle_over_ckpt']:16.2f}"
        )
    result = {
        "preset": args.preset,
        "dtype": args.dtype,
        "tp": args.tp,
        "pp": args.pp,
        "checkpoint_bytes": nbytes,
        "round_trip_bit_identical": identical,
        "target_rss_over_ckpt": 1.5,
        "rows": out_rows,
    }
    if args.out:
        from egrsd_megatron.utils.atomic import atomic_write_json

        atomic_write_json(args.out, result)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
