"""Reward scoring throughput: in-process raw loop (baseline) vs the bounded pool at 1 worker and all cores.

    python bench/rewards.py [--n 400] [--out bench_rewards.json]

The responses are a mix of the forms a math model writes (fractions, decimals, roots, sets, wrong answers,
no box, thinking blocks). Ratios are against the in-process loop measured in the same run (the pool adds
process isolation and a hard time bound; with several cores it should also be faster).
"""

from __future__ import annotations

import argparse
import os
import time


def _cases(n: int):
    base = [
        ("<think>\nhalf\n</think>\n\nSo \\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{0.5}", "1/2"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
        ("\\boxed{41}", "42"),
        ("The answer is 7", "7"),
        ("\\boxed{x = 3}", "3"),
        ("\\boxed{2\\pi}", "2\\pi"),
    ]
    return [base[i % len(base)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from egrsd_megatron.rewards import raw_reward, score_batch

    cases = _cases(args.n)
    rs, ans = [c[0] for c in cases], [c[1] for c in cases]
    raw = raw_reward("math")
    raw(*cases[0])  # import math-verify outside the timing
    t0 = time.perf_counter()
    ref = [raw(r, a) for r, a in cases]
    t_raw = time.perf_counter() - t0
    rows = [{"mode": "in-process raw loop (baseline)", "workers": 1, "seconds": t_raw, "ratio_vs_baseline": 1.0}]
    for workers in (1, 0):
        score_batch(rs[:4], ans[:4], num_workers=workers, timeout_s=60)  # start the pool outside the timing
        t0 = time.perf_counter()
        got, stats = score_batch(rs, ans, num_workers=workers, timeout_s=60)
        dt = time.perf_counter() - t0
        assert got == ref, "pool scores differ from the in-process scores"
        rows.append(
            {
                "mode": "bounded pool",
                "workers": workers or os.cpu_count(),
                "seconds": dt,
                "ratio_vs_baseline": t_raw / dt,
                "timeouts": stats["timeouts"],
            }
        )
    print(f"{'mode':34s} {'workers':>7s} {'seconds':>8s} {'items/s':>8s} {'speed vs baseline':>18s}")
    for r in rows:
        print(
            f"{r['mode']:34s} {r['workers']:7d} {r['seconds']:8.2f} {args.n / r['seconds']:8.1f} "
            f"{r['ratio_vs_baseline']:17.2f}x"
        )
    if args.out:
        from egrsd_megatron.utils.atomic import atomic_write_json

        atomic_write_json(args.out, {"n": args.n, "cpu_count": os.cpu_count(), "rows": rows})


if __name__ == "__main__":
    main()
