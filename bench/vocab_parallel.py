"""Benchmark the fused vocab-parallel token statistics against an unfused baseline and a floor.

  (a) fused        egrsd_megatron.ops.vocab_parallel.token_stats: student log-prob (grad) + teacher
                   log-prob + teacher entropy in one pass, 2 all-reduces per chunk, no softmax saved.
  (b) unfused      today's RL-framework style: one autograd Function per quantity, each upcasting the whole
                   slice to fp32 with its own MAX/SUM(/SUM) all-reduces and saving the softmax for backward
                   (log-prob as NeMo-RL's DistributedLogprob, entropy as verl's _VocabParallelEntropy;
                   written here from their published structure).
  (c) megatron_ce  megatron.core.tensor_parallel.vocab_parallel_cross_entropy on the student alone.
  (d) fused_inplace  (a) with inplace_backward=True (issue 16, "Logits memory"): the gradient is written into
                   the logits' own storage. Its input plays the model's output: a fresh copy per step (made
                   before the clock, like (c)'s fp32 case) handed in through an identity whose backward
                   drops the gradient, as the model's output layer consumes it; (a)'s input is a leaf that
                   accumulates a .grad, the same one extra [N, V_local] tensor the default backward allocates.

Per (TP, N, V, dtype): forward+backward wall time (median over reps, slowest rank) and peak resident memory
above the inputs (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the step;
glibc is told to mmap every large block so freed memory really leaves the process). Each TP runs in its
own spawned gloo process group. Sizes whose estimated footprint exceeds --mem-budget-gib (summed over the
ranks) are skipped per variant and recorded with the reason. Targets (ratios measured in one run):
(a) <= 0.5 x (b) in time, (a) <= 0.25 x (b) in peak memory, (a) <= 2.0 x (c) in time; (d) reported as its
peak memory and time over (a)'s.

    .venv/bin/python bench/vocab_parallel.py --out bench_vocab_parallel.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

# Before torch (and before the spawned ranks inherit the environment): every allocation above 64 KiB is
# its own mmap, returned to the OS on free, so resident-memory peaks measure live tensors only.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("fused", "unfused", "megatron_ce", "fused_inplace")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GiB = float(1 << 30)


# ------------------------------------------------------------------------------------ baseline (b)
class UnfusedLogprob(torch.autograd.Function):
    """Target log-prob, NeMo-RL DistributedLogprob style: fp32 upcast, MAX + SUM + SUM, saves softmax."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_end, group):
        target_mask = (target < vocab_start) | (target >= vocab_end)
        masked_target = target - vocab_start
        masked_target[target_mask] = 0
        logits = logits.to(torch.float32)
        logits_max = torch.amax(logits, dim=-1, keepdim=True)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max
        sum_exp = shifted.exp().sum(-1, keepdim=True)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        log_probs = shifted - sum_exp.log_()
        softmax = log_probs.exp()
        lp = torch.gather(log_probs, -1, masked_target.unsqueeze(-1)).squeeze(-1)
        lp[target_mask] = 0.0
        dist.all_reduce(lp, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(softmax, target_mask, masked_target)
        return lp

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        is_chosen = (~target_mask).unsqueeze(-1) * F.one_hot(masked_target, num_classes=softmax.size(-1))
        grad_input = is_chosen.float().sub_(softmax)
        grad_input.mul_(grad_output.unsqueeze(-1))
        return grad_input, None, None, None, None


class UnfusedEntropy(torch.autograd.Function):
    """Entropy, verl _VocabParallelEntropy style: MAX + SUM + SUM, unshifted form, saves logits + softmax."""

    @staticmethod
    def forward(ctx, logits, group):
        logits = logits.float()
        logits_max = logits.max(dim=-1, keepdim=True).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        exp_logits = (logits - logits_max).exp_()
        sum_exp = exp_logits.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        softmax = exp_logits.div_(sum_exp)
        sum_softmax_times_logits = (softmax * logits).sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_softmax_times_logits, op=dist.ReduceOp.SUM, group=group)
        entropy = logits_max + sum_exp.log() - sum_softmax_times_logits
        ctx.save_for_backward(logits, softmax, sum_softmax_times_logits)
        return entropy.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_output):
        logits, softmax, sst = ctx.saved_tensors
        return softmax * (sst - logits) * grad_output.unsqueeze(-1), None


class _ModelOutput(torch.autograd.Function):
    """Identity standing in for the model's output layer: the logits as a non-leaf tensor (a view, no copy)
    whose gradient flows into `anchor` and is dropped there, as the output layer's backward consumes it."""

    @staticmethod
    def forward(ctx, logits, anchor):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return None, torch.zeros(())


# ------------------------------------------------------------------------------------ measurement
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def estimate_bytes(variant: str, n: int, v_local: int, dtype_bytes: int) -> int:
    """Per-rank footprint including the two input tensors (upper estimates, used only to skip sizes)."""
    e = n * v_local
    inputs = 2 * e * dtype_bytes
    if variant == "fused":
        return inputs + e * dtype_bytes + 3 * (1 << 22) * 4 + (64 << 20)
    if variant == "fused_inplace":  # + the fresh copy of the student logits it consumes
        return inputs + e * dtype_bytes + 3 * (1 << 22) * 4 + (64 << 20)
    if variant == "unfused":  # saved softmax + fp32 temporaries (measured ~5 e*4 above the inputs)
        return inputs + 6 * e * 4
    return inputs + 3 * e * 4  # megatron_ce: fp32 copy / clone, softmax, grad


def _make_inputs(n: int, v_local: int, v: int, dtype: torch.dtype, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    out = []
    for _ in range(2):
        t = torch.empty(n, v_local, dtype=dtype)
        for r0 in range(0, n, 256):  # fill in slices: no full-size fp32 temporary for bf16 inputs
            r1 = min(n, r0 + 256)
            t[r0:r1] = torch.randn(r1 - r0, v_local, generator=g) * 2.0
        out.append(t)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    return out[0], out[1], y


def _step_fn(
    variant: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    y: torch.Tensor,
    group,
    rank: int,
    v: int,
    chunk: int,
    temps: Optional[dict] = None,
):
    from egrsd_megatron.ops.vocab_parallel import token_stats

    v_local = student.shape[1]
    if variant == "fused":
        x = student.requires_grad_(True)

        def step():
            st = token_stats(x, teacher, y, group=group, vocab_size=v, chunk_size=chunk, **(temps or {}))
            st.student_logprob.sum().backward()
            x.grad = None
            return st.student_logprob.detach(), st.teacher_entropy

        return step, None
    if variant == "fused_inplace":
        fresh: Dict[str, torch.Tensor] = {}
        anchor = torch.zeros((), requires_grad=True)

        def prepare():
            fresh["x"] = student.detach().clone()

        def step():
            x = _ModelOutput.apply(fresh.pop("x"), anchor)
            st = token_stats(
                x, teacher, y, group=group, vocab_size=v, chunk_size=chunk, inplace_backward=True, **(temps or {})
            )
            st.student_logprob.sum().backward()
            return st.student_logprob.detach(), st.teacher_entropy

        return step, prepare
    if variant == "unfused":
        x = student.requires_grad_(True)

        def step():
            lp = UnfusedLogprob.apply(x, y, rank * v_local, (rank + 1) * v_local, group)
            with torch.no_grad():
                UnfusedLogprob.apply(teacher, y, rank * v_local, (rank + 1) * v_local, group)
                ht = UnfusedEntropy.apply(teacher, group)
            lp.sum().backward()
            x.grad = None
            return lp.detach(), ht

        return step, None
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if student.dtype == torch.float32:
        # Megatron overwrites fp32 logits in place: each step gets a fresh copy made before the clock
        # starts (it plays the role of the model's output, which Megatron may consume).
        holder: Dict[str, torch.Tensor] = {}

        def prepare():
            holder["x"] = student.detach().clone().requires_grad_(True)

        def step():
            x = holder.pop("x")
            loss = vocab_parallel_cross_entropy(x, y)
            loss.sum().backward()
            x.grad = None
            return -loss.detach(), None

        return step, prepare
    x = student.requires_grad_(True)

    def step():
        loss = vocab_parallel_cross_entropy(x, y)
        loss.sum().backward()
        x.grad = None
        return -loss.detach(), None

    return step, None


def _worker(rank: int, world: int, grid: List[tuple], opts: dict) -> List[dict]:
    torch.set_num_threads(opts["threads"])
    from egrsd_megatron.distributed.runtime import init_distributed

    init_distributed(tp=world)
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    rows = []
    for n, v, dname in grid:
        dtype = DTYPES[dname]
        v_local = v // world
        row = {"tp": world, "n": n, "v": v, "dtype": dname, "rank": rank, "variants": {}}
        need = {k: estimate_bytes(k, n, v_local, dtype.itemsize) / GiB for k in VARIANTS}  # per rank
        runnable = [
            k for k in VARIANTS if need[k] <= opts["mem_budget_gib"] and need[k] * world <= opts["total_budget_gib"]
        ]
        for k in VARIANTS:
            if k not in runnable:
                row["variants"][k] = {
                    "skipped": f"estimated {need[k]:.1f} GiB per rank x {world} rank(s) "
                    f"exceeds --mem-budget-gib {opts['mem_budget_gib']} per rank "
                    f"or --total-budget-gib {opts['total_budget_gib']}"
                }
        if runnable:
            student, teacher, y = _make_inputs(n, v_local, v, dtype, rank, opts["seed"])
            outputs = {}
            for k in runnable:
                step, prepare = _step_fn(k, student, teacher, y, group, rank, v, opts["chunk"], opts.get("temps"))
                times, peaks = [], []
                for rep in range(opts["warmup"] + opts["reps"]):
                    if prepare:
                        prepare()
                    dist.barrier(group=group)
                    rss0 = _status_kib("VmRSS")
                    ok = _reset_peak()
                    t0 = time.perf_counter()
                    out = step()
                    dt = time.perf_counter() - t0
                    peak = (_status_kib("VmHWM") - rss0) * 1024 / GiB if ok else float("nan")
                    if rep >= opts["warmup"]:
                        times.append(dt)
                        peaks.append(peak)
                    outputs[k] = out
                    del out
                student.requires_grad_(False)
                row["variants"][k] = {
                    "time_s": statistics.median(times),
                    "times_s": times,
                    "peak_gib": max(peaks),
                    "est_gib": need[k] / world,
                }
            # The variants must compute the same log-probs (else the comparison is meaningless).
            ref = outputs["unfused"] if "unfused" in outputs else outputs.get("megatron_ce")
            if "fused" in outputs and "fused_inplace" in outputs:  # the same arithmetic: bitwise
                row["inplace_equal"] = bool(torch.equal(outputs["fused"][0], outputs["fused_inplace"][0]))
            if "fused" in outputs and ref is not None:
                row["max_abs_diff_logprob"] = float((outputs["fused"][0] - ref[0]).abs().max())
                if "unfused" in outputs:
                    row["max_abs_diff_entropy"] = float(
                        (outputs["fused"][1] - outputs["unfused"][1]).abs().max().detach()
                    )
            del student, teacher, y, outputs
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ report
def _merge(per_rank: List[List[dict]]) -> List[dict]:
    """Slowest rank's time and largest rank's peak per variant."""
    merged = []
    for rows in zip(*per_rank):
        base = {k: rows[0][k] for k in ("tp", "n", "v", "dtype")}
        base["variants"] = {}
        for k in VARIANTS:
            vs = [r["variants"][k] for r in rows]
            if "skipped" in vs[0]:
                base["variants"][k] = vs[0]
            else:
                base["variants"][k] = {
                    "time_s": max(x["time_s"] for x in vs),
                    "peak_gib": max(x["peak_gib"] for x in vs),
                    "times_s_rank0": vs[0]["times_s"],
                }
        for key in ("max_abs_diff_logprob", "max_abs_diff_entropy", "inplace_equal"):
            if key in rows[0]:
                base[key] = max(r[key] for r in rows)
        a, b, c, d = (base["variants"][k] for k in VARIANTS)
        ratios = {}
        if "time_s" in a and "time_s" in d:
            ratios["time_d_over_a"] = d["time_s"] / a["time_s"]
            ratios["mem_d_over_a"] = d["peak_gib"] / a["peak_gib"]
        if "time_s" in d and "time_s" in b:
            ratios["mem_d_over_b"] = d["peak_gib"] / b["peak_gib"]
        if "time_s" in a and "time_s" in b:
            ratios["time_a_over_b"] = a["time_s"] / b["time_s"]
            ratios["mem_a_over_b"] = a["peak_gib"] / b["peak_gib"]
        if "time_s" in a and "time_s" in c:
            ratios["time_a_over_c"] = a["time_s"] / c["time_s"]
        base["ratios"] = ratios
        merged.append(base)
    return merged


def _fmt(v: dict, key: str, spec: str) -> str:
    return format(v[key], spec) if key in v else "skip"


def print_table(rows: List[dict]) -> None:
    hdr = (
        f"{'TP':>2} {'N':>5} {'V':>6} {'dtype':>5} | {'a s':>7} {'b s':>7} {'c s':>7} | {'a GiB':>6} "
        f"{'b GiB':>6} {'c GiB':>6} | {'t a/b':>6} {'m a/b':>6} {'t a/c':>6} | {'d GiB':>6} {'m d/a':>6} "
        f"{'t d/a':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        a, b, c, d = (r["variants"][k] for k in VARIANTS)
        q = r["ratios"]
        print(
            f"{r['tp']:>2} {r['n']:>5} {r['v']:>6} {r['dtype']:>5} | {_fmt(a, 'time_s', '7.3f')} "
            f"{_fmt(b, 'time_s', '7.3f')} {_fmt(c, 'time_s', '7.3f')} | {_fmt(a, 'peak_gib', '6.3f')} "
            f"{_fmt(b, 'peak_gib', '6.3f')} {_fmt(c, 'peak_gib', '6.3f')} | "
            f"{_fmt(q, 'time_a_over_b', '6.3f')} {_fmt(q, 'mem_a_over_b', '6.3f')} "
            f"{_fmt(q, 'time_a_over_c', '6.3f')} | "
            f"{_fmt(d, 'peak_gib', '6.3f')} {_fmt(q, 'mem_d_over_a', '6.3f')} {_fmt(q, 'time_d_over_a', '6.3f')}"
        )
    print("targets: t a/b <= 0.5, m a/b <= 0.25, t a/c <= 2.0 ('skip': over the memory budget, see JSON)")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--v", type=int, nargs="+", default=[32768, 151936])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (1: robust on a shared box)")
    p.add_argument(
        "--mem-budget-gib",
        type=float,
        default=6.0,
        help="skip a variant whose estimated footprint per rank (inputs included) exceeds this",
    )
    p.add_argument(
        "--total-budget-gib",
        type=float,
        default=10.0,
        help="... or whose footprint summed over the ranks exceeds this (shared machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="(a) only: token_stats(temperature=...)")
    p.add_argument(
        "--entropy-temperature",
        type=float,
        default=None,
        help="(a) only: token_stats(entropy_temperature=...) (default: = --temperature)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from egrsd_megatron.testing.spawn import run_distributed
    from egrsd_megatron.utils.atomic import atomic_write_json

    opts = {
        "threads": args.threads,
        "mem_budget_gib": args.mem_budget_gib,
        "reps": args.reps,
        "total_budget_gib": args.total_budget_gib,
        "warmup": args.warmup,
        "chunk": args.chunk,
        "seed": args.seed,
        "temps": {"temperature": args.temperature, "entropy_temperature": args.entropy_temperature},
    }
    for tp in args.tp:
        bad = [v for v in args.v if v % tp]
        if bad:
            raise SystemExit(f"--v {bad} not divisible by TP={tp}")
    grid = [(n, v, d) for n in args.n for v in args.v for d in args.dtype]
    rows: List[dict] = []
    t0 = time.time()
    for tp in args.tp:
        rows += _merge(run_distributed(_worker, tp, grid, opts, timeout=3600))
        if args.out:  # a partial file after each TP, replaced atomically: a long run is never all lost
            atomic_write_json(
                args.out,
                {"config": vars(args), "torch": torch.__version__, "rows": rows, "complete": tp == args.tp[-1]},
            )
    print_table(rows)
    print(
        f"(total {time.time() - t0:.0f} s; {args.threads} thread(s) per rank; median of {args.reps} reps "
        f"after {args.warmup} warm-up; torch {torch.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
