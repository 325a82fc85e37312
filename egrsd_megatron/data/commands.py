"""`egrsd data synth` (synthetic problems) and `egrsd data prepare` (evaluation sets -> our jsonl)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("data", help="datasets: synthetic problems, evaluation-set preparation")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="write N synthetic arithmetic word problems (jsonl)")
    s.add_argument("--n", type=int, required=True, help="number of problems")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    s.add_argument("--min-steps", type=int, default=1, help="fewest arithmetic steps per problem")
    s.add_argument("--max-steps", type=int, default=2, help="most arithmetic steps per problem")
    s.set_defaults(func=_synth)
    from .benchmarks import BENCHMARKS  # light: no heavy imports

    q = dsub.add_parser("prepare", help="convert a public evaluation-set file to our jsonl fields (docs/data.md)")
    q.add_argument("name", choices=sorted(BENCHMARKS))
    q.add_argument("--src", required=True, help="source file: jsonl | json | parquet | datasets folder")
    q.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    q.set_defaults(func=_prepare)


def _synth(args: argparse.Namespace) -> int:
    import json

    from ..utils.atomic import atomic_write_text
    from .synth import generate_problems

    rows = generate_problems(args.n, args.seed, args.min_steps, args.max_steps)
    atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} problems to {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .benchmarks import prepare_benchmark

    n = prepare_benchmark(args.name, args.src, args.out)
    print(f"wrote {n} {args.name} problems to {args.out}")
    return 0
