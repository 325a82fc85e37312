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
  (e) verl         verl's own vocab-parallel functions (verl 0.9.1, verl/utils/megatron/tensor_parallel.py,
                   loaded as that single file: `import verl` pulls in Ray), called as verl's Megatron actor
                   calls them (MegatronEngineWithLMHead._lm_head_logits_processor): the student's log-prob
                   with grad, vocab_parallel_log_probs_from_logits alone (calculate_entropy=False); the
                   teacher under no_grad with calculate_entropy=True: logits.clone(), vocab_parallel_entropy,
                   vocab_parallel_log_probs_from_logits on the clone. The same three statistics as (a)/(d).
                   The student input is a fresh leaf copy per step made before the clock, as (c)'s fp32
                   case (Megatron's cross-entropy overwrites fp32 logits in place and saves them, which
                   (d)'s identity view does not allow); its .grad is dropped after the step. Untempered: verl's in-place
                   `logits.div_(temperature)` is skipped, as T = 1 costs (a)/(d) nothing. Needs verl
                   (`make peers-env`, run with .venv-peers/bin/python); skipped with the reason otherwise.

Per (TP, N, V, dtype): forward+backward wall time (median over reps, slowest rank) and peak resident memory
above the inputs (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the step;
glibc is told to mmap every large block so freed memory really leaves the process). Each TP runs in its
own spawned gloo process group. Sizes whose estimated footprint exceeds --mem-budget-gib (summed over the
ranks) are skipped per variant and recorded with the reason. Targets (ratios measured in one run):
(a) <= 0.5 x (b) in time, (a) <= 0.25 x (b) in peak memory, (a) <= 2.0 x (c) in time; (d) reported as its
peak memory and time over (a)'s; issue 16 against verl: peak (d) <= 0.5 x (e), time (d) <= 1.0 x (e).
The log-probs and the teacher entropy of (e) are checked against (a)'s within derived bounds (`_verl_bounds`).

    .venv/bin/python bench/vocab_parallel.py --out bench_vocab_parallel.json
    .venv-peers/bin/python bench/vocab_parallel.py --tp 2 --n 4096 --v 65536 --dtype bf16   # with (e)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
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

VARIANTS = ("fused", "unfused", "megatron_ce", "fused_inplace", "verl")
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


# ------------------------------------------------------------------------------------ verl (e)
VERL_VERSION = "0.9.1"
_VERL: Dict[str, object] = {}


def _verl_tp():
    """verl's verl/utils/megatron/tensor_parallel.py as a module, or the reason it cannot be had (a str).

    Loaded as one file (importlib of its path) because `import verl` runs verl/__init__.py, which imports
    verl.protocol and with it Ray; the file itself needs only torch and megatron.core.parallel_state."""
    if "mod" not in _VERL:
        try:
            path = importlib.metadata.distribution("verl").locate_file("verl/utils/megatron/tensor_parallel.py")
            version = importlib.metadata.version("verl")
            spec = importlib.util.spec_from_file_location("verl_tensor_parallel", str(path))
            if spec is None or not os.path.exists(str(path)):
                raise ImportError(f"{path} not found")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _VERL["mod"], _VERL["version"] = mod, version
        except (ImportError, OSError) as e:
            _VERL["mod"] = (
                f"verl not importable ({type(e).__name__}: {e}); `make peers-env` installs verl=={VERL_VERSION} "
                "into .venv-peers: run this bench with .venv-peers/bin/python"
            )
    return _VERL["mod"]


def _verl_lm_head(vtp, logits: torch.Tensor, labels: torch.Tensor, calculate_entropy: bool):
    """verl 0.9.1 MegatronEngineWithLMHead._lm_head_logits_processor at temperature 1 (its div_ skipped),
    without sum_pi_squared / distillation: (log_probs, entropy or None), as its lines compute them."""
    entropy = None
    if calculate_entropy:
        logits_bak = logits.clone()
        entropy = vtp.vocab_parallel_entropy(logits)
    else:
        logits_bak = logits
    return vtp.vocab_parallel_log_probs_from_logits(logits_bak, labels), entropy


def _verl_bounds(teacher: torch.Tensor, v: int, group, lp_max: float) -> Dict[str, float]:
    """Derived bounds on |(e) - (a)| per token (worst case, not fitted).

    Log-probs: both sides do fp32 math on the same bf16/fp32 logits (Megatron's cross-entropy upcasts).
    log p(y) = (z_y - m) - log S, S = sum_v exp(z_v - m) over the V ids: each exp and each of the V - 1
    additions of positive terms adds at most eps32 relative error to S (naive order; pairwise is smaller),
    i.e. (V + 1) eps32 absolute in log S; z_y - m rounds at most once (eps32 |z_y - m| <= 2 M eps32), and
    the final subtraction rounds once: eps32 |log p|. Both
    implementations err independently: bound_lp = 2 eps32 (V + 1 + 2 M + |log p|max), M = max |z|.

    Teacher entropy: verl's _VocabParallelEntropy does NOT upcast; with bf16 logits its z - m, exp, the
    softmax division and the three reduced results are bf16 (the sums accumulate in fp32, then round).
    With u = 2^-8 (bf16 unit roundoff) and |d| = |z - m| <= 2M: exp(d_hat) has relative error
    eps_v <= u (|d| + 1); S_hat: R = u (2M + 2) + V eps32; p_hat: eps_v + R + u; T = sum p z
    (|T| <= M, products and result rounded): M (u (2M + 2) + R) + V eps32 M + 2 u M; log S (1 <= S <= V):
    R + u log V; the two final additions: u (M + log V) + u log V. bound_h = their sum (fp32 logits:
    u -> eps32); ours (fp32 math throughout) adds its own (V + 1) eps32-type terms: + 2 (V + 1) eps32 (M + 1)."""
    m = torch.zeros(())
    for r0 in range(0, teacher.shape[0], 256):  # max |z| in slices: no full-size temporary
        m = torch.maximum(m, teacher[r0 : r0 + 256].abs().amax().float())
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    big_m = float(m)
    e32 = torch.finfo(torch.float32).eps / 2  # unit roundoff
    u = 2.0**-8 if teacher.dtype == torch.bfloat16 else e32
    log_v = math.log(v)
    r = u * (2 * big_m + 2) + v * e32  # relative error of S_hat
    err_t = big_m * (u * (2 * big_m + 2) + r) + v * e32 * big_m + 2 * u * big_m  # T = sum p z
    err_log_s = r + u * log_v
    err_adds = u * (big_m + log_v) + u * log_v
    err_ours = 2 * (v + 1) * e32 * (big_m + 1)
    bound_h = err_t + err_log_s + err_adds + err_ours
    bound_lp = 2 * e32 * (v + 1 + 2 * big_m + lp_max)
    return {"max_abs_logit": big_m, "bound_logprob": bound_lp, "bound_entropy": bound_h}


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
    if variant == "verl":  # fresh copy, student fp32 softmax + its cast-back grad, teacher clone, entropy's
        # shifted/softmax buffer, the teacher cross-entropy's fp32 copy, one fp32 temporary of slack
        return inputs + 3 * e * dtype_bytes + 3 * e * 4 + e * 4
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
            return st.student_logprob.detach(), st.teacher_entropy, st.teacher_logprob

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
            return st.student_logprob.detach(), st.teacher_entropy, st.teacher_logprob

        return step, prepare
    if variant == "verl":
        vtp = _verl_tp()
        fresh_v: Dict[str, torch.Tensor] = {}

        def prepare():
            fresh_v["x"] = student.detach().clone().requires_grad_(True)

        def step():
            x = fresh_v.pop("x")
            lp, _ = _verl_lm_head(vtp, x, y, calculate_entropy=False)  # the policy pass
            with torch.no_grad():  # the teacher pass
                lt, ht = _verl_lm_head(vtp, teacher, y, calculate_entropy=True)
            lp.sum().backward()
            x.grad = None
            return lp.detach(), ht, lt

        return step, prepare
    if variant == "unfused":
        x = student.requires_grad_(True)

        def step():
            lp = UnfusedLogprob.apply(x, y, rank * v_local, (rank + 1) * v_local, group)
            with torch.no_grad():
                lt = UnfusedLogprob.apply(teacher, y, rank * v_local, (rank + 1) * v_local, group)
                ht = UnfusedEntropy.apply(teacher, group)
            lp.sum().backward()
            x.grad = None
            return lp.detach(), ht, lt

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
            return -loss.detach(), None, None

        return step, prepare
    x = student.requires_grad_(True)

    def step():
        loss = vocab_parallel_cross_entropy(x, y)
        loss.sum().backward()
        x.grad = None
        return -loss.detach(), None, None

    return step, None


def _verl_unavailable(opts: dict) -> Optional[str]:
    """Why (e) does not run here, or None."""
    mod = _verl_tp()
    if isinstance(mod, str):
        return mod
    temps = opts.get("temps") or {}
    if temps.get("temperature", 1.0) != 1.0 or temps.get("entropy_temperature") not in (None, 1.0):
        return "verl variant is untempered (verl divides the logits in place before these functions): use T = 1"
    return None


def _verl_check(ours: tuple, theirs: tuple, teacher: torch.Tensor, v: int, group) -> dict:
    """Max |(e) - (a)| for log pS(y), log pT(y), H_T, with the derived bounds of `_verl_bounds`."""
    names = ("student_logprob", "teacher_entropy", "teacher_logprob")
    ours = tuple(t.detach() for t in ours)
    lp_max = max(float(ours[0].abs().max()), float(ours[2].abs().max()))
    out = {"verl_check": _verl_bounds(teacher, v, group, lp_max)}
    ok = True
    for i, name in enumerate(names):
        diff = float((ours[i].float() - theirs[i].float()).abs().max())
        bound = out["verl_check"]["bound_entropy" if name == "teacher_entropy" else "bound_logprob"]
        out["verl_check"][f"max_abs_diff_{name}"] = diff
        ok = ok and diff <= bound
    out["verl_check"]["within_bounds"] = ok
    return out


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
        verl_off = _verl_unavailable(opts)
        if verl_off and "verl" in runnable:
            runnable.remove("verl")
            row["variants"]["verl"] = {"skipped": verl_off}
        for k in VARIANTS:
            if k not in runnable and k not in row["variants"]:
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
            if "fused" in outputs and "verl" in outputs:
                row.update(_verl_check(outputs["fused"], outputs["verl"], teacher, v, group))
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
        if "verl_check" in rows[0]:  # every rank holds the same reduced values; keep the worst
            checks = [r["verl_check"] for r in rows]
            base["verl_check"] = {k: max(c[k] for c in checks) for k in checks[0] if k != "within_bounds"}
            base["verl_check"]["within_bounds"] = all(c["within_bounds"] for c in checks)
        a, b, c, d, e = (base["variants"][k] for k in VARIANTS)
        ratios = {}
        for name, x in (("a", a), ("d", d)):
            if "time_s" in x and "time_s" in e:
                ratios[f"time_{name}_over_e"] = x["time_s"] / e["time_s"]
                ratios[f"mem_{name}_over_e"] = x["peak_gib"] / e["peak_gib"]
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
        a, b, c, d, _ = (r["variants"][k] for k in VARIANTS)
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
    print_verl_table(rows)


def print_verl_table(rows: List[dict]) -> None:
    """(d) and (a) over verl's own functions (e), with issue 16's targets and the value check."""
    print()
    hdr = (
        f"{'TP':>2} {'N':>5} {'V':>6} {'dtype':>5} | {'e s':>7} {'e GiB':>6} | {'d s':>7} {'d GiB':>6} "
        f"{'m d/e':>7} {'t d/e':>6} | {'m a/e':>6} {'t a/e':>6} | verdict (peak d <= 0.5 e, time d <= 1.0 e)"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        d, e = r["variants"]["fused_inplace"], r["variants"]["verl"]
        q = r["ratios"]
        if "time_d_over_e" in q:
            verdict = (
                f"peak {'met' if q['mem_d_over_e'] <= 0.5 else 'MISSED'}, "
                f"time {'met' if q['time_d_over_e'] <= 1.0 else 'MISSED'}"
            )
        else:
            verdict = "not measured: " + e.get("skipped", d.get("skipped", "?"))
        print(
            f"{r['tp']:>2} {r['n']:>5} {r['v']:>6} {r['dtype']:>5} | {_fmt(e, 'time_s', '7.3f')} "
            f"{_fmt(e, 'peak_gib', '6.3f')} | {_fmt(d, 'time_s', '7.3f')} {_fmt(d, 'peak_gib', '6.3f')} "
            f"{_fmt(q, 'mem_d_over_e', '7.4f')} {_fmt(q, 'time_d_over_e', '6.3f')} | "
            f"{_fmt(q, 'mem_a_over_e', '6.3f')} {_fmt(q, 'time_a_over_e', '6.3f')} | {verdict}"
        )
        if "verl_check" in r:
            c = r["verl_check"]
            print(
                f"   values vs (a): max |diff| log pS {c['max_abs_diff_student_logprob']:.2e}, "
                f"log pT {c['max_abs_diff_teacher_logprob']:.2e} (bound {c['bound_logprob']:.2e}); "
                f"H_T {c['max_abs_diff_teacher_entropy']:.2e} (bound {c['bound_entropy']:.2e}, verl's entropy "
                f"in the input dtype); {'within' if c['within_bounds'] else 'OUTSIDE'} the bounds"
            )


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
    verl_off = _verl_unavailable(opts)
    if verl_off:
        print(f"(e) verl skipped: {verl_off}", file=sys.stderr)
    else:
        print(f"(e) verl {_VERL['version']}: {_VERL['mod'].__file__}", file=sys.stderr)
    rows: List[dict] = []
    t0 = time.time()
    for tp in args.tp:
        rows += _merge(run_distributed(_worker, tp, grid, opts, timeout=3600))
        if args.out:  # a partial file after each TP, replaced atomically: a long run is never all lost
            atomic_write_json(
                args.out,
                {
                    "config": vars(args),
                    "torch": torch.__version__,
                    "verl": _VERL.get("version"),
                    "rows": rows,
                    "complete": tp == args.tp[-1],
                },
            )
    print_table(rows)
    print(
        f"(total {time.time() - t0:.0f} s; {args.threads} thread(s) per rank; median of {args.reps} reps "
        f"after {args.warmup} warm-up; torch {torch.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
