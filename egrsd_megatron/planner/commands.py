"""`egrsd plan CONFIG [key=value ...] --nodes N --gpus-per-node G [--seq-len S]`: layout + per-GPU memory.

Prints the table; exits 2 with a one-line error when a size does not divide or the peak exceeds the
budget (the table is still printed first, so the user sees which term to shrink).
"""

from __future__ import annotations

import argparse
import dataclasses


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("plan", help="parallel layout and per-GPU memory estimate of a config on a cluster")
    p.add_argument("config", help="YAML file in conf/ or a path")
    p.add_argument("overrides", nargs="*", help="section.key=value (right after CONFIG, before the options)")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="prompt + response tokens (default: data.max_prompt_tokens + rollout.max_new_tokens)",
    )
    p.add_argument("--gpu-mem-gb", type=float, default=80.0, help="per-GPU memory budget in GB (default 80)")
    p.add_argument("--stats-chunk", type=int, default=1024, help="token_stats chunk size in tokens")
    p.add_argument("--no-flash-attention", action="store_true", help="count the S x S attention probabilities")
    p.add_argument(
        "--rollout-gpu-fraction",
        type=float,
        default=None,
        help="vllm engine: its share of GPU memory (default: the config's rollout.gpu_memory_utilization)",
    )
    p.add_argument("--overhead-gb", type=float, default=4.0, help="CUDA context, NCCL, fragmentation allowance")
    p.add_argument("--json", dest="json_out", default=None, help="also write the plan as JSON to this file")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from ..config.loader import load_config
    from ..models import resolve_arch
    from ..utils.atomic import atomic_write_json
    from .memory import PlanSettings, check_fits, format_plan, plan

    cfg = load_config(args.config, args.overrides)
    settings = PlanSettings(
        gpu_mem_gb=args.gpu_mem_gb,
        seq_len=args.seq_len,
        stats_chunk=args.stats_chunk,
        flash_attention=not args.no_flash_attention,
        rollout_gpu_fraction=(
            args.rollout_gpu_fraction if args.rollout_gpu_fraction is not None else cfg.rollout.gpu_memory_utilization
        ),
        overhead_gb=args.overhead_gb,
    )
    p = plan(cfg, resolve_arch(cfg.model), args.nodes, args.gpus_per_node, settings)
    print(format_plan(p))
    if args.json_out:
        lay = p.layout
        atomic_write_json(
            args.json_out,
            {
                "layout": {
                    "nodes": lay.nodes,
                    "gpus_per_node": lay.gpus_per_node,
                    "tp": lay.tp,
                    "pp": lay.pp,
                    "dp": lay.dp,
                    "micro_batch_size": lay.micro_batch_size,
                    "num_microbatches": lay.num_microbatches,
                    "rollouts_per_dp_rank": lay.rollouts_per_dp_rank,
                },
                "micro_batch": dataclasses.asdict(p.micro_batch) if p.micro_batch is not None else None,
                "seq_len": p.seq_len,
                "tokens_per_step": p.tokens_per_step,
                "params_per_gpu": p.params_per_gpu,
                "stage": p.stage,
                "static_bytes": p.static,
                "train_transient_bytes": p.train_transient,
                "rollout_transient_bytes": p.rollout_transient,
                "training_phase_bytes": p.training_phase,
                "generation_phase_bytes": p.generation_phase,
                "peak_bytes": p.total,
                "notes": p.notes,
                "budget_bytes": p.budget,
                "fits": p.fits,
            },
        )
    check_fits(p)
    return 0
