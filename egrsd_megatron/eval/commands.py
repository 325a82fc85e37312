"""`egrsd eval`, `egrsd frontier`, `egrsd curves`."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Tuple

# Config only (light: dataclasses + omegaconf); the evaluation code is imported in _eval, for a fast --help.
from ..config import ConfigError, load_config
from ..config.schema import EvalConfig, PromptConfig

# The options whose defaults come from a config's `eval:` section (--config) or else EvalConfig's defaults.
_FROM_EVAL_SECTION = ("benchmarks", "k", "temperature", "top_p", "top_k", "max_new_tokens", "batch_size")


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("eval", help="evaluate a model: avg@k, pass@k, response lengths (resumable)")
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face folder (config.json + safetensors), Megatron checkpoint, step or run folder",
    )
    # None = not given: filled in from the config's eval section (--config) or EvalConfig's defaults.
    p.add_argument(
        "--benchmarks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="DATA_DIR/NAME.jsonl each (default: the config's eval.benchmarks)",
    )
    p.add_argument("--k", type=int, default=None, help="samples per problem (default: eval.k, 1)")
    p.add_argument("--data-dir", default="data/eval", help="folder of NAME.jsonl files (default %(default)s)")
    p.add_argument("--out", required=True, help="result folder (rerun the same command to resume)")
    p.add_argument("--label", default=None, help="name in tables and plots (default: model folder name)")
    p.add_argument("--temperature", type=float, default=None, help="default: eval.temperature, 0.6")
    p.add_argument("--top-p", type=float, default=None, help="default: eval.top_p, 0.95")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: eval.top_k, 20)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens, 1024")
    p.add_argument(
        "--batch-size", type=int, default=None, help="samples per generation batch (default: eval.batch_size, 16)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--tokenizer", default=None, help="'qwen3' or a tokenizer folder (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="math", help="reward used to judge answers (default %(default)s)")
    p.add_argument(
        "--engine",
        choices=("auto", "hf", "vllm"),
        default="auto",
        help="auto: vllm when a GPU and vllm are present, else hf",
    )
    p.add_argument("--no-thinking", action="store_true", help="Qwen3 chat template with thinking off")
    p.add_argument(
        "--chat-format",
        choices=("qwen3", "tokenizer"),
        default="qwen3",
        help="qwen3: the project's Qwen3 template; tokenizer: the tokenizer's own chat template",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a training config: its prompt templates and chat format (so the model is asked exactly as "
        "in training; --no-thinking / --chat-format are then ignored) and, for every option not "
        "given here, its eval section (eval.benchmarks, eval.k, eval.temperature, ...)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)

    f = sub.add_parser("frontier", help="plot accuracy vs mean length of several `egrsd eval` results")
    f.add_argument("results", nargs="+", metavar="RESULT_DIR")
    f.add_argument("--out", default="frontier.png")
    f.add_argument("--labels", nargs="+", default=None)
    f.set_defaults(func=_frontier)

    c = sub.add_parser("curves", help="plot training accuracy and response length per step")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders with metrics.jsonl")
    c.add_argument("--out", default="curves.png")
    c.add_argument("--labels", nargs="+", default=None)
    c.set_defaults(func=_curves)


def _eval_defaults(args: argparse.Namespace) -> Tuple[Any, Any]:
    """(EvalConfig, PromptConfig) for this command: the config's sections with --config, else the defaults;
    then every option given on the command line replaces its eval.* value."""
    if args.config:
        cfg = load_config(args.config)
        eval_cfg, prompt_cfg = cfg.eval, cfg.prompt
    else:
        eval_cfg = EvalConfig()
        prompt_cfg = PromptConfig(thinking=not args.no_thinking, chat_format=args.chat_format)
    given = {k: getattr(args, k) for k in _FROM_EVAL_SECTION if getattr(args, k) is not None}
    return dataclasses.replace(eval_cfg, **given), prompt_cfg


def _eval(args: argparse.Namespace) -> int:
    from .runner import EvalSettings, run_eval

    ev, prompt_cfg = _eval_defaults(args)
    if not ev.benchmarks:
        raise ConfigError("no benchmarks: pass --benchmarks NAME [NAME ...] or set eval.benchmarks in --config")
    if ev.k < 1 or ev.batch_size < 1 or ev.max_new_tokens < 1:
        raise ConfigError(
            "--k, --batch-size and --max-new-tokens (eval.k, eval.batch_size, eval.max_new_tokens) must be >= 1"
        )
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    settings = EvalSettings.from_section(
        ev,
        engine=args.engine,
        model=os.path.abspath(args.model),
        label=args.label or os.path.basename(os.path.normpath(args.model)),
        seed=args.seed,
        reward=args.reward,
        tokenizer=args.tokenizer,
        limit=args.limit,
    )
    summary = run_eval(
        args.model,
        ev.benchmarks,
        args.data_dir,
        args.out,
        settings,
        batch_size=ev.batch_size,
        prompt_cfg=prompt_cfg,
        progress=not args.no_progress,
    )
    for name, m in {**summary["benchmarks"], "average": summary["average"]}.items():
        print(
            f"{name:>12}  accuracy {100 * m['accuracy']:6.2f}%  mean length {m['mean_length']:8.1f}  "
            f"truncated {100 * m['truncation_rate']:5.1f}%"
        )
    print(f"results in {args.out}")
    return 0


def _frontier(args: argparse.Namespace) -> int:
    from .plots import plot_frontier

    print(plot_frontier(args.results, args.out, args.labels))
    return 0


def _curves(args: argparse.Namespace) -> int:
    from .plots import plot_curves

    print(plot_curves(args.runs, args.out, args.labels))
    return 0
