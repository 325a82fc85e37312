"""`egrsd eval`, `egrsd frontier`, `egrsd curves`."""
from __future__ import annotations

import argparse
import os


def register(sub: "argparse._SubParsersAction") -> None:
    from ..config.schema import EvalConfig
    d = EvalConfig()
    p = sub.add_parser("eval", help="evaluate a model: avg@k, pass@k, response lengths (resumable)")
    p.add_argument("--model", required=True, help="Hugging Face folder (config.json + safetensors) or Megatron checkpoint")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="NAME", help="DATA_DIR/NAME.jsonl each")
    p.add_argument("--k", type=int, default=d.k, help="samples per problem (default %(default)s)")
    p.add_argument("--data-dir", default="data/eval", help="folder of NAME.jsonl files (default %(default)s)")
    p.add_argument("--out", required=True, help="result folder (rerun the same command to resume)")
    p.add_argument("--label", default=None, help="name in tables and plots (default: model folder name)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per generation batch")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--tokenizer", default=None, help="'qwen3' or a tokenizer folder (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward", default="math", help="reward used to judge answers (default %(default)s)")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vllm when a GPU and vllm are present, else hf")
    p.add_argument("--no-thinking", action="store_true", help="Qwen3 chat template with thinking off")
    p.add_argument("--chat-format", choices=("qwen3", "tokenizer"), default="qwen3",
                   help="qwen3: the project's Qwen3 template; tokenizer: the tokenizer's own chat template")
    p.add_argument("--config", default=None,
                   help="take the prompt templates and chat format from this training config (so the model is "
                        "asked exactly as in training); --no-thinking / --chat-format are then ignored")
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


def _eval(args: argparse.Namespace) -> int:
    from ..config.schema import PromptConfig
    from .runner import EvalSettings, default_engine_name, run_eval
    if args.k < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--k, --batch-size and --max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    settings = EvalSettings(
        model=os.path.abspath(args.model), label=args.label or os.path.basename(os.path.normpath(args.model)),
        k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, seed=args.seed, reward=args.reward,
        engine=default_engine_name() if args.engine == "auto" else args.engine, tokenizer=args.tokenizer,
        limit=args.limit)
    if args.config:
        from ..config import load_config
        prompt_cfg = load_config(args.config).prompt
    else:
        prompt_cfg = PromptConfig(thinking=not args.no_thinking, chat_format=args.chat_format)
    summary = run_eval(args.model, args.benchmarks, args.data_dir, args.out, settings, batch_size=args.batch_size,
                       prompt_cfg=prompt_cfg, progress=not args.no_progress)
    for name, m in {**summary["benchmarks"], "average": summary["average"]}.items():
        print(f"{name:>12}  accuracy {100 * m['accuracy']:6.2f}%  mean length {m['mean_length']:8.1f}  "
              f"truncated {100 * m['truncation_rate']:5.1f}%")
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
