"""`egrsd train CONFIG [key=value ...]` (run under torchrun or srun for more than one process)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("train", help="on-policy self-distillation training (EGRSD, CL-EGRSD, GRPO, RLSD, OPSD)")
    p.add_argument("config", help="YAML config (conf/*.yaml or a path)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from .loop import train_main

    return train_main(args.config, args.overrides)
