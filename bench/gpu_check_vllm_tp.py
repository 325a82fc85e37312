#!/usr/bin/env python
"""vLLM tensor parallelism as the trainer runs it (rollout.vllm_tp=2, sleep mode on), on two GPUs:
    torchrun --nproc-per-node=2 bench/gpu_check_vllm_tp.py --out gpu_check_vllm_tp.json
(bench/gpu_check.sh runs it when two GPUs are visible). GPU-only, UNVERIFIED until it has run on a GPU node.

Each torchrun rank is one trainer process: torch.distributed is initialised first (the trainer's world),
then every rank starts its own VLLMEngine with tensor_parallel_size=2 (vLLM's external_launcher: the two
ranks form one vLLM TP group), asleep at once. Both ranks refit from the same full HF tensors (as
gather_hf_state_dict gives every rank), generate the same prompts, and must get the same completions;
rank 0 compares the greedy first tokens with the hf engine (bf16) and checks a refit A -> B -> A while
asleep. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_vllm_tp.json")
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()

    from egrsd_megatron.config.schema import RolloutConfig
    from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
    from egrsd_megatron.models.presets import PRESETS
    from egrsd_megatron.rollout import SamplingParams
    from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model
    from egrsd_megatron.rollout.vllm_engine import make_vllm_engine
    from egrsd_megatron.testing.tiny import save_random_hf_model

    arch = dataclasses.replace(PRESETS["qwen3_tiny_chat"], head_dim=32)  # 4 heads, 2 KV groups: TP 2 divides
    tok = byte_tokenizer()
    root = tempfile.mkdtemp(prefix=f"gpu_check_vllm_tp{rank}_")
    a, b = (
        save_random_hf_model(arch, os.path.join(root, x), seed=i, randomize_norms=True, tokenizer=tok)
        for i, x in enumerate("AB")
    )
    ro = RolloutConfig(engine="vllm", vllm_tp=world, vllm_sleep=True, gpu_memory_utilization=0.3)
    engine = make_vllm_engine(ro, arch.to_hf_config(), tok)
    prompts = [[5 + (i * 7 + j) % 200 for j in range(8 + i)] for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=32)
    checks = []

    def named(d):
        return build_hf_model({}, d).state_dict().items()

    def gen():
        out = [c.response_ids for c in engine.generate(prompts, greedy)]
        engine.sleep()
        return out

    try:
        engine.update_weights(named(a))
        out_a = gen()
        engine.update_weights(named(b))
        out_b = gen()
        engine.update_weights(named(a))
        again = gen()
        every = [None] * world
        dist.all_gather_object(every, (out_a, out_b, again))
        checks.append(("vllm TP group members return the same completions", all(e == every[0] for e in every)))
        checks.append(("vllm TP refit A -> B -> A while asleep", again == out_a and out_b != out_a))
        if rank == 0:
            hf = HFEngine(build_hf_model({}, a, dtype=torch.bfloat16).cuda(), tok)
            ref = [c.response_ids for c in hf.generate(prompts, greedy)]
            first = sum(x[0] == y[0] for x, y in zip(out_a, ref))
            checks.append(
                (f"vllm TP={world} greedy first tokens vs hf engine ({first}/{len(prompts)})", first == len(prompts))
            )
    finally:
        engine.close()
    if rank == 0:
        for name, ok in checks:
            print(f"[{'PASS' if ok else 'FAIL'}] {name}", flush=True)
        with open(args.out, "w") as f:
            json.dump({"world": world, "checks": [{"name": n, "ok": bool(ok)} for n, ok in checks]}, f, indent=1)
    ok = all(ok for _, ok in checks)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
