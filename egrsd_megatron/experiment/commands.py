"""`egrsd experiment CONFIG [key=value ...]` and `egrsd inspect RUN --step N | --samples FILE`."""

from __future__ import annotations

import argparse
import os

DEFAULT_CONFIG = "experiment_cpu"
QUICK_CONFIG = "experiment_quick"


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "experiment",
        help="train several methods x seeds, evaluate all on the same held-out "
        "problems, paired bootstrap statistics and plots (resumable)",
    )
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"experiment YAML (default conf/{DEFAULT_CONFIG}.yaml; --quick: conf/{QUICK_CONFIG}.yaml)",
    )
    p.add_argument("overrides", nargs="*", help="experiment key=value (e.g. methods=[grpo,cl_egrsd] seeds=[1,2])")
    p.add_argument("--quick", action="store_true", help="the tiny random Qwen3 variant (minutes; what CI runs)")
    p.add_argument("--out", default=None, help="output folder (default: the file's out_dir)")
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only recompute summary.md/json and the plots from the files already there",
    )
    p.set_defaults(func=_experiment)

    q = sub.add_parser(
        "inspect", help="one rollout's tokens coloured by teacher entropy, gate and lookahead lift (PNG + HTML)"
    )
    q.add_argument("run", nargs="?", default=None, help="training run folder (reads RUN/samples.jsonl)")
    q.add_argument("--samples", default=None, help="a samples.jsonl file instead of a run folder")
    q.add_argument("--step", type=int, default=None, help="training step of the rollout (as in metrics.jsonl)")
    q.add_argument(
        "--rollout",
        type=int,
        default=None,
        help="index among that step's rollouts (default: the one with the largest lookahead lift)",
    )
    q.add_argument("--out", default=None, help="output path without extension (default RUN/inspect/stepN_lineL)")
    q.set_defaults(func=_inspect)


def _experiment(args: argparse.Namespace) -> int:
    from .runner import Experiment
    from .schema import load_experiment

    config = args.config
    if config is not None and "=" in config:  # only overrides were given: they are not a file name
        args.overrides.insert(0, config)
        config = None
    if config is None:
        config = QUICK_CONFIG if args.quick else DEFAULT_CONFIG
    elif args.quick:
        raise ValueError("--quick picks conf/experiment_quick.yaml: give either a CONFIG or --quick")
    spec = load_experiment(config, args.overrides)
    exp = Experiment(spec, args.out)
    if args.summary_only:
        from .plots import plot_experiment_curves, plot_experiment_frontier
        from .summary import build_summary, write_summary

        summary = build_summary(exp.out, spec)
        plot_experiment_frontier(summary, exp.path("frontier.png"))
        plot_experiment_curves(exp.out, spec, exp.path("curves.png"))
        write_summary(exp.out, summary)
    else:
        from .launch import LaunchError

        try:
            summary = exp.run()
        except LaunchError as e:
            print(f"egrsd experiment: {e}\nrerun the same command to continue where it stopped")
            return 1
    print("\n".join(f"- {s}" for s in summary["statements"]))
    print(f"\nwrote {os.path.join(exp.out, 'summary.md')}, summary.json, frontier.png, curves.png")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .token_view import inspect_rollout

    if (args.run is None) == (args.samples is None):
        raise ValueError("give a RUN folder or --samples FILE (one of them)")
    path = args.samples or os.path.join(args.run, "samples.jsonl")
    png, page = inspect_rollout(path, args.out, step=args.step, rollout=args.rollout)
    print(f"wrote {png} and {page}")
    return 0
