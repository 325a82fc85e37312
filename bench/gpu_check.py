#!/usr/bin/env python
"""One GPU sanity + speed check (run through bench/gpu_check.sh on one H100/H200; ends in a few minutes).

1. token_stats on CUDA (bf16 logits, full Qwen3 vocabulary) vs a float64 reference: values (student and
   teacher log-prob, teacher and student entropy, reverse KL) and the gradient wrt the student logits;
   plus its tokens/s.
2. Qwen3 tiny and 0.6B-shaped GPTModel (Transformer Engine layer spec when TE is present), bf16 and FP8
   (hybrid, delayed): forward + backward tokens/s and peak memory, loss finite, FP8 logits close to bf16 ones
   (same weights), and bf16 close to fp32 on the tiny model.
3. MasterWeightAdamW (bf16 params, fp32 masters): masters equal fp32 AdamW bitwise; step time.
4. The vllm rollout engine (when vllm is installed) as the cluster configs run it, sleep mode on: greedy and
   log-probs vs the hf engine (bf16), memory released by sleep (mem_get_info), wake without refit, refit
   A -> B -> A while asleep, level-2 sleep, generation tokens/s of both engines (vllm_checks).
5. vLLM tensor parallelism (rollout.vllm_tp=2) needs two GPUs and torchrun: bench/gpu_check_vllm_tp.py,
   which bench/gpu_check.sh runs when two GPUs are visible.
Prints a table and writes everything to --out (JSON). A check that fails prints FAIL and the exit code is 1;
an FP8 case refused on a pre-Hopper GPU is recorded as "refused" (that refusal is itself the expected
behaviour there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS: Dict[str, Any] = {"checks": [], "speed": []}
# `--cpu-dry-run` runs the same code on the CPU at toy sizes (no TE, no FP8): it checks the script itself.
DEV = torch.device("cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else float("nan")


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)


def timed(fn, iters: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


# ----------------------------------------------------------------------------------------------- token_stats
def reference_stats(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, w: Dict[str, torch.Tensor]):
    """float64 full-vocabulary reference of every statistic and of d(sum_k w_k . stat_k)/d zs (autograd)."""
    zs = zs.double().requires_grad_(True)
    zt = zt.double()
    ls_all, lt_all = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = ls_all.exp(), lt_all.exp()
    out = {
        "student_logprob": ls_all.gather(-1, y[:, None])[:, 0],
        "teacher_logprob": lt_all.gather(-1, y[:, None])[:, 0],
        "teacher_entropy": -(pt * lt_all).sum(-1),
        "student_entropy": -(ps * ls_all).sum(-1),
        "kl": (ps * (ls_all - lt_all)).sum(-1),
    }
    obj = sum((w[k] * out[k]).sum() for k in ("student_logprob", "student_entropy", "kl"))
    (grad,) = torch.autograd.grad(obj, zs)
    return {k: v.detach() for k, v in out.items()}, grad


def check_token_stats(n_tokens: int, vocab: int) -> None:
    from egrsd_megatron.ops.vocab_parallel import token_stats

    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    # Logits like a trained LM's: a scale of a few units, a few large spikes (peaked distributions).
    zs = (torch.randn(n_tokens, vocab, device=dev, generator=g) * 3).bfloat16()
    zt = (zs.float() + torch.randn(n_tokens, vocab, device=dev, generator=g)).bfloat16()
    zt[:, :8] += 20
    y = torch.randint(0, vocab, (n_tokens,), device=dev, generator=g)
    w = {
        k: torch.randn(n_tokens, device=dev, dtype=torch.float64, generator=g)
        for k in ("student_logprob", "student_entropy", "kl")
    }

    x = zs.clone().requires_grad_(True)
    st = token_stats(x, zt, y, vocab_size=vocab, student_entropy=True, kl="reverse")
    obj = sum((w[k].float() * getattr(st, k)).sum() for k in ("student_logprob", "student_entropy", "kl"))
    obj.backward()
    # Reference in row blocks so the float64 copies stay a few GB.
    errs = {k: 0.0 for k in ("student_logprob", "teacher_logprob", "teacher_entropy", "student_entropy", "kl")}
    gerr, gscale = 0.0, 0.0
    for a in range(0, n_tokens, 512):
        b = min(a + 512, n_tokens)
        ref, gref = reference_stats(zs[a:b], zt[a:b], y[a:b], {k: v[a:b] for k, v in w.items()})
        for k in errs:
            errs[k] = max(errs[k], (getattr(st, k)[a:b].double() - ref[k]).abs().max().item())
        # The gradient is stored in bf16 like the logits (8 mantissa bits): allow its rounding, 2^-8 relative,
        # on top of a small absolute error of the fp32 math.
        d = (x.grad[a:b].double() - gref).abs() - 2.0**-8 * gref.abs()
        gerr = max(gerr, d.max().item())
        gscale = max(gscale, gref.abs().max().item())
        del ref, gref
    # fp32 math on bf16 inputs against float64 on the same (bf16-rounded) inputs: ~1e-5 absolute per token
    # for log-probs / entropies of magnitude ~10 (log V = 11.9).
    tol = 2e-4
    for k, e in errs.items():
        check(f"token_stats {k} vs float64 ({n_tokens} x {vocab})", e < tol, f"max abs err {e:.2e} (tol {tol:g})")
    check(
        "token_stats d/dz_student vs float64 autograd",
        gerr < 1e-5 * max(gscale, 1.0),
        f"max (|err| - 2^-8 |ref|) {gerr:.2e} (max |grad| {gscale:.2e}; bf16 gradient rounding allowed)",
    )

    def step():
        x.grad = None
        s = token_stats(x, zt, y, vocab_size=vocab, student_entropy=True, kl="reverse", check_finite=False)
        (s.student_logprob.sum() + s.student_entropy.sum() + s.kl.sum()).backward()

    step()
    reset_peak()
    sec = timed(step, 5)
    RESULTS["speed"].append(
        {
            "case": f"token_stats fwd+bwd {n_tokens}x{vocab} bf16",
            "tokens_per_s": n_tokens / sec,
            "ms": sec * 1e3,
            "peak_gb": peak_gb(),
        }
    )
    x = zs = zt = None  # free the logits (not `del`: the step closure above refers to them)
    reset_peak()


# ----------------------------------------------------------------------------------------------- models
def build(preset: str, precision: str, seed: int = 1234):
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.runtime import seed_everything
    from egrsd_megatron.models import build_model, resolve_arch

    mc = ModelConfig(preset=preset, params_dtype="fp32" if precision == "fp32" else "bf16", precision=precision)
    arch = resolve_arch(mc)
    seed_everything(seed)  # same seed -> same weights for every precision
    return build_model(arch, mc), arch


def run_model(preset: str, precision: str, batch: int, seq: int, iters: int, ids: torch.Tensor) -> Dict[str, Any]:
    from egrsd_megatron.models import forward_logits

    reset_peak()
    model, arch = build(preset, precision)
    model.train()
    targets = torch.roll(ids, -1, dims=1)

    def step():
        logits = forward_logits(model, ids)
        loss = torch.nn.functional.cross_entropy(
            logits[..., : arch.vocab_size].float().flatten(0, 1), targets.flatten()
        )
        loss.backward()
        return loss

    loss = step().detach()  # warm-up (TE kernels, FP8 amax history)
    model.zero_grad(set_to_none=True)
    sec = timed(step, iters)
    with torch.no_grad():
        model.eval()
        logits = forward_logits(model, ids)[..., : arch.vocab_size].float()
    out = {
        "case": f"{preset} {precision} fwd+bwd b{batch} s{seq}",
        "tokens_per_s": batch * seq / sec,
        "ms": sec * 1e3,
        "peak_gb": peak_gb(),
        "loss": float(loss),
        "logits": logits.cpu(),
        "te": type(model.decoder.layers[0].self_attention.linear_qkv).__module__,
    }
    model = None  # free it (not `del`: the step closure above refers to it)
    reset_peak()
    return out


def model_checks(fast: bool) -> None:
    from egrsd_megatron.config.schema import ConfigError

    cases = [("qwen3_tiny", 8, 256, 10), ("qwen3_0.6b", 2 if fast else 4, 2048, 5 if fast else 10)]
    if DEV.type == "cpu":
        cases = [("qwen3_tiny", 2, 32, 2)]
    for preset, batch, seq, iters in cases:
        g = torch.Generator(device=DEV).manual_seed(1)
        vocab = 200 if preset == "qwen3_tiny" else 151936
        ids = torch.randint(0, vocab, (batch, seq), device=DEV, generator=g)
        results = {}
        for precision in (["fp32"] if preset == "qwen3_tiny" else []) + ["bf16", "fp8"]:
            try:
                r = run_model(preset, precision, batch, seq, iters, ids)
            except ConfigError as e:
                RESULTS["speed"].append({"case": f"{preset} {precision}", "refused": str(e)})
                cap = torch.cuda.get_device_capability() if DEV.type == "cuda" else (0, 0)
                expected = precision == "fp8" and cap < (9, 0)
                check(f"{preset} {precision} build", expected, f"refused: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                traceback.print_exc()
                check(f"{preset} {precision} fwd+bwd", False, f"{type(e).__name__}: {e}")
                continue
            results[precision] = r
            if DEV.type == "cuda":
                from egrsd_megatron.models.precision import te_available

                if te_available():
                    check(
                        f"{preset} {precision} uses the Transformer Engine layer spec",
                        "transformer_engine" in r["te"],
                        f"linear_qkv from {r['te']}",
                    )
            RESULTS["speed"].append({k: v for k, v in r.items() if k != "logits"})
            check(
                f"{preset} {precision} fwd+bwd",
                math.isfinite(r["loss"]),
                f"loss {r['loss']:.4f} (ln V = {math.log(vocab):.4f} expected near init), layer module {r['te']}",
            )
        # Same weights: bf16 and FP8 logits should agree to low-precision rounding (relative to their spread).
        for a, b, tol in (("fp32", "bf16", 0.05), ("bf16", "fp8", 0.25)):
            if a in results and b in results:
                la, lb = results[a]["logits"], results[b]["logits"]
                rel = ((la - lb).float().pow(2).mean().sqrt() / la.float().std()).item()
                check(f"{preset} {b} logits vs {a}", rel < tol, f"rms diff / std = {rel:.4f} (tol {tol})")


def check_master_weights(numel: int) -> None:
    """MasterWeightAdamW on the device: its fp32 masters follow torch AdamW on fp32 copies bitwise (same
    bf16-representable gradients), the bf16 parameters are their rounding; step time vs that AdamW."""
    from egrsd_megatron.trainer.optim import MasterWeightAdamW

    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    g = torch.Generator(device=DEV).manual_seed(0)
    shapes = [(numel // 1024, 1024), (1024,)]
    low = [torch.nn.Parameter(torch.randn(s, device=DEV, generator=g).to(torch.bfloat16)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_ref = MasterWeightAdamW(low, **kw), torch.optim.AdamW(ref, **kw)
    for _ in range(3):
        grads = [torch.randn(s, device=DEV, generator=g).to(torch.bfloat16) for s in shapes]
        for p, q, gr in zip(low, ref, grads):
            p.grad, q.grad = gr, gr.float()
        opt_low.step()
        opt_ref.step()
    ok = all(torch.equal(opt_low.state[p]["master"], q.detach()) for p, q in zip(low, ref))
    rounded = all(torch.equal(p.detach(), q.detach().to(torch.bfloat16)) for p, q in zip(low, ref))
    check(
        f"MasterWeightAdamW masters == fp32 AdamW bitwise ({numel:,} params)",
        ok and rounded,
        f"masters equal: {ok}, params are their rounding: {rounded}",
    )
    t_low, t_ref = timed(opt_low.step, 5), timed(opt_ref.step, 5)
    RESULTS["speed"].append(
        {
            "case": f"MasterWeightAdamW step, {numel:,} bf16 params",
            "tokens_per_s": 0.0,
            "ms": t_low * 1e3,
            "peak_gb": peak_gb(),
            "vs_fp32_adamw": t_low / t_ref,
        }
    )


def check_async_checkpoint(preset: str) -> None:
    """torch_dist async save of a model on DEV with its optimizer (issue 18; on CUDA the state is staged to
    host memory before the writer process forks, which the CPU suite cannot exercise): weights changed in
    place right after the save call returns must not be what is written, and the loop-visible save time
    against a synchronous torch_dist save (target <= 0.2x; the second save of each kind is timed: the first
    in a process pays one-time start-up)."""
    import tempfile

    from egrsd_megatron.checkpoint.async_save import AsyncCheckpointSaver
    from egrsd_megatron.checkpoint.train_state import load_train_state, save_train_state
    from egrsd_megatron.config.schema import OptimConfig
    from egrsd_megatron.trainer.optim import build_optimizer, build_scheduler

    model, arch = build(preset, "bf16")
    opt = build_optimizer([model], OptimConfig())
    sched = build_scheduler(opt, 100, OptimConfig())
    for p in model.parameters():  # Adam states exist only after a step
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    with tempfile.TemporaryDirectory() as root:
        times = {}
        for kind in ("sync", "async"):
            for i in (1, 2):
                saver = AsyncCheckpointSaver() if kind == "async" else None
                sync()
                t0 = time.perf_counter()
                folder = save_train_state(
                    os.path.join(root, kind),
                    i,
                    model,
                    arch,
                    opt,
                    sched,
                    {"step": i},
                    1,
                    fmt="torch_dist",
                    async_saver=saver,
                )
                times[kind] = time.perf_counter() - t0
                if saver is None:
                    continue
                if i == 2:
                    before = {n: q.detach().clone() for n, q in model.named_parameters()}
                    with torch.no_grad():
                        for q in model.parameters():
                            q.add_(1.0)  # a training step during the write
                    sync()
                t1 = time.perf_counter()
                saver.wait()
                times["async write + finalize"] = time.perf_counter() - t1
                saver.close()
        load_train_state(folder, model, arch, opt, sched)
        same = all(torch.equal(q, before[n]) for n, q in model.named_parameters())
    ratio = times["async"] / times["sync"]
    RESULTS["checkpoint"] = {"preset": preset, **{f"{k}_s": v for k, v in times.items()}, "ratio": ratio}
    check(
        f"async torch_dist save: snapshot unchanged by an in-place update ({preset})",
        same,
        f"the loaded weights {'equal' if same else 'DIFFER from'} those at the save call",
    )
    if DEV.type == "cpu":  # a dry run's toy model is all fixed cost: the ratio is printed, not judged
        print(f"[info] async save call / sync save at toy size: {ratio:.3f}x (dry run: not a measurement)")
        return
    check(
        f"async torch_dist save: loop-visible time ({preset})",
        ratio <= 0.2,
        f"save call {times['async']:.2f} s vs sync {times['sync']:.2f} s = {ratio:.3f}x (target <= 0.2); "
        f"background write + finalize {times['async write + finalize']:.2f} s",
    )


def _free_gb() -> float:
    """Free device memory as the driver sees it (torch.cuda.mem_get_info): vLLM's sleep-mode pool lives outside
    torch's caching allocator, so memory_allocated would not see it released."""
    return torch.cuda.mem_get_info()[0] / 1e9 if DEV.type == "cuda" else float("nan")


def vllm_checks(fast: bool) -> None:
    """The vllm rollout engine on this GPU (bf16) as the cluster configs run it (rollout.vllm_sleep=true,
    level 1), against the hf engine (bf16, rollout.hf_dtype unset) on a tiny random Qwen3:
    - start asleep, refit (dummy weights -> A: weights woken alone), generate (KV cache woken): greedy first
      tokens equal the hf engine's, and the sampled tokens' log-probs within the trainer's own on-policy
      threshold (rollout.max_logprob_diff) of the hf engine's on the common prefix;
    - memory released by sleep (torch.cuda.mem_get_info before / after), as a fraction of the share
      gpu_memory_utilization x total that `egrsd plan` stops counting while the trainer runs;
    - after a level-1 sleep, generating without a refit gives the same tokens (weights back from host memory);
    - refit A -> B -> A, each refit while asleep: B differs, A again is identical;
    - level 2 (weights discarded): generate refuses until a refit, then A is identical again;
    - generation tokens/s of both engines.
    On a CPU dry run the engine runs without sleep mode (vLLM's CPU backend has none). vLLM allows one engine
    per process, so everything goes through one engine. GPU-only, unverified until this has run on a GPU."""
    import dataclasses
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        RESULTS["checks"].append({"name": "vllm engine", "ok": True, "detail": "skipped: vllm not installed"})
        print("SKIP vllm engine: vllm not installed", flush=True)
        return
    from egrsd_megatron.config.schema import RolloutConfig
    from egrsd_megatron.data.byte_tokenizer import byte_tokenizer
    from egrsd_megatron.models.presets import PRESETS
    from egrsd_megatron.rollout import SamplingParams
    from egrsd_megatron.rollout.footprint import engine_weight_dtype
    from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model
    from egrsd_megatron.rollout.vllm_engine import make_vllm_engine
    from egrsd_megatron.testing.tiny import save_random_hf_model

    cuda = DEV.type == "cuda"
    arch = dataclasses.replace(PRESETS["qwen3_tiny_chat"], head_dim=32)  # vLLM CPU has no head_dim 16 kernel
    root = tempfile.mkdtemp(prefix="gpu_check_vllm_")
    tok = byte_tokenizer()
    a, b = (
        save_random_hf_model(arch, os.path.join(root, x), seed=i, randomize_norms=True, tokenizer=tok)
        for i, x in enumerate("AB")
    )
    ro = RolloutConfig(engine="vllm", vllm_sleep=cuda, vllm_sleep_level=1, gpu_memory_utilization=0.3)
    # The hf engine in the dtype make_hf_engine builds on this device (rollout/footprint.py: bf16 on a GPU).
    dtype = engine_weight_dtype(RolloutConfig(engine="hf"), DEV.type)
    hf = {x: HFEngine(build_hf_model({}, d, dtype=dtype).to(DEV), tok) for x, d in (("A", a), ("B", b))}
    prompts = [[5 + (i * 7 + j) % 200 for j in range(8 + i)] for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=32)
    reset_peak()  # hand torch's cached blocks back first: vLLM sizes its share from the free memory
    free0 = _free_gb()
    t = time.perf_counter()
    engine = make_vllm_engine(ro, arch.to_hf_config(), tok)  # dummy weights; asleep at once with sleep mode
    start_s = time.perf_counter() - t
    try:

        def named(d):
            return build_hf_model({}, d).state_dict().items()

        free_asleep_start = _free_gb()
        engine.update_weights(named(a))
        comps_a = engine.generate(prompts, greedy)
        out_a = [c.response_ids for c in comps_a]
        free_awake = _free_gb()
        ref = hf["A"].generate(prompts, greedy)
        ref_a = [c.response_ids for c in ref]
        first = sum(x[0] == y[0] for x, y in zip(out_a, ref_a))
        prefix = [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(out_a, ref_a)]
        exact = not cuda  # fp32 on CPU: token for token; bf16 kernels differ on a GPU
        check(
            "vllm greedy vs hf engine (tiny Qwen3)",
            (prefix == [len(x) for x in out_a]) if exact else first == len(prompts),
            f"first tokens equal {first}/{len(prompts)}, mean equal prefix "
            f"{sum(prefix) / len(prefix):.1f}/{greedy.max_new_tokens} ({engine.dtype} vs hf {dtype})",
        )
        # Log-probs of the same tokens (the common prefix), greedy: log softmax(z) at T = 1 in both engines.
        diffs = [abs(u - v) for c, r, n in zip(comps_a, ref, prefix) for u, v in zip(c.logprobs[:n], r.logprobs[:n])]
        mean_diff = sum(diffs) / max(len(diffs), 1)
        check(
            "vllm vs hf engine log-probs (greedy, common prefix)",
            bool(diffs) and mean_diff <= ro.max_logprob_diff,  # no common prefix at all is a failure too
            f"mean |diff| {mean_diff:.2e}, max {max(diffs, default=0.0):.2e} over {len(diffs)} tokens "
            f"(threshold: rollout.max_logprob_diff={ro.max_logprob_diff}, the trainer's on-policy check)",
        )
        RESULTS["vllm_logprob_diff"] = {"mean": mean_diff, "max": max(diffs, default=0.0), "n": len(diffs)}
        if engine.sleep_level is not None:
            engine.sleep()
            free_asleep = _free_gb()
            total = torch.cuda.mem_get_info()[1] / 1e9
            share = ro.gpu_memory_utilization * total
            released = free_asleep - free_awake
            RESULTS["vllm_sleep_memory_gb"] = {
                "free_before_engine": free0,
                "free_asleep_after_start": free_asleep_start,
                "free_awake": free_awake,
                "free_asleep": free_asleep,
                "released": released,
                "share": share,
            }
            # `egrsd plan` counts none of the share while the trainer runs: the criterion is that most of it
            # comes back (the rest, CUDA graph pools and vLLM's context, sits in the plan's overhead allowance;
            # the measured fraction is recorded to replace this bound with a number).
            check(
                "vllm sleep releases its share (mem_get_info)",
                released >= 0.5 * share,
                f"released {released:.2f} GB of the {share:.2f} GB share ({released / share:.0%}); "
                f"still held asleep vs before start: {free0 - free_asleep:.2f} GB",
            )
            again = [c.response_ids for c in engine.generate(prompts, greedy)]  # woken, no refit
            check("vllm level-1 sleep keeps the weights", again == out_a, f"identical after wake: {again == out_a}")
            engine.sleep()
        engine.update_weights(named(b))
        out_b = [c.response_ids for c in engine.generate(prompts, greedy)]
        ref_b = [c.response_ids for c in hf["B"].generate(prompts, greedy)]
        engine.sleep()
        engine.update_weights(named(a))
        again = [c.response_ids for c in engine.generate(prompts, greedy)]
        check(
            "vllm refit A -> B -> A" + (" (each refit while asleep)" if engine.sleep_level else ""),
            again == out_a and out_b != out_a and sum(x[0] == y[0] for x, y in zip(out_b, ref_b)) == len(prompts),
            f"A again identical: {again == out_a}; B differs from A: {out_b != out_a}",
        )
        if engine.sleep_level is not None:
            engine.sleep_level = 2  # the same engine, now discarding its weights when it sleeps
            engine.sleep()
            try:
                engine.generate(prompts, greedy)
                refused = False
            except RuntimeError:
                refused = True
            engine.update_weights(named(a))
            again2 = [c.response_ids for c in engine.generate(prompts, greedy)]
            check(
                "vllm level-2 sleep: refit restores the weights",
                refused and again2 == out_a,
                f"generate before refit refused: {refused}; A after refit identical: {again2 == out_a}",
            )
        rows = [prompts[i % len(prompts)] for i in range(16 if fast else 64)]
        params = SamplingParams(temperature=1.0, max_new_tokens=64 if fast else 256, seed=0)
        for name, eng in (("vllm", engine), ("hf", hf["A"])):
            t = time.perf_counter()
            n = sum(len(c.response_ids) for c in eng.generate(rows, params))
            sec = time.perf_counter() - t
            RESULTS["speed"].append(
                {
                    "case": f"{name} engine generate {len(rows)} rows x {params.max_new_tokens}",
                    "tokens_per_s": n / sec,
                    "ms": sec * 1e3,
                    "peak_gb": peak_gb(),
                    "engine_start_s": start_s if name == "vllm" else None,
                }
            )
    finally:
        engine.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--fast", action="store_true", help="smaller sizes (a quicker smoke run)")
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the script's code on the CPU at toy sizes (checks the script, measures nothing)",
    )
    args = ap.parse_args()
    global DEV
    if args.cpu_dry_run:
        DEV = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible: run this on a GPU node (or --cpu-dry-run)", file=sys.stderr)
        return 2
    import megatron.core

    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models.precision import te_available

    cuda = DEV.type == "cuda"
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "memory_gb": torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": getattr(megatron.core, "__version__", "?"),
        "transformer_engine": None,
    }
    if te_available():
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "present")
    RESULTS["info"] = info
    print(json.dumps(info), flush=True)
    t0 = time.time()
    init_distributed(tp=1, pp=1, seed=1234)
    n_tok, vocab = (64, 1000) if not cuda else (2048 if args.fast else 8192, 151936)
    for name, fn in (
        ("token_stats", lambda: check_token_stats(n_tok, vocab)),
        ("models", lambda: model_checks(args.fast)),
        ("master weights", lambda: check_master_weights(2**16 if not cuda else 2**26)),
        ("async checkpoint", lambda: check_async_checkpoint("qwen3_0.6b" if cuda else "qwen3_tiny")),
        ("vllm", lambda: vllm_checks(args.fast or not cuda)),
    ):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            check(name, False, f"{type(e).__name__}: {e}")
    RESULTS["wall_s"] = time.time() - t0

    print(f"\n{'case':<48}{'tokens/s':>14}{'ms/iter':>10}{'peak GB':>10}")
    for r in RESULTS["speed"]:
        if "refused" in r:
            print(f"{r['case']:<48}{'refused':>14}")
        else:
            print(f"{r['case']:<48}{r['tokens_per_s']:>14,.0f}{r['ms']:>10.1f}{r['peak_gb']:>10.2f}")
    n_fail = sum(not c["ok"] for c in RESULTS["checks"])
    print(f"\n{info['device']}: {len(RESULTS['checks']) - n_fail} passed, {n_fail} failed, {RESULTS['wall_s']:.0f} s")
    from egrsd_megatron.utils.atomic import atomic_write_json

    atomic_write_json(args.out, RESULTS)
    print(f"wrote {args.out}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
