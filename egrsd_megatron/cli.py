"""`egrsd` entry point: parses the command line and dispatches; the work lives in the packages.

Each subcommand is owned by one package module exposing `register(subparsers)`; that module adds its
parser(s) with `set_defaults(func=...)` and keeps heavy imports (torch, megatron) inside the function, so
`egrsd --help` stays fast.

Errors: a user error (ConfigError, or one of utils/errors.py's UserError types: a bad or missing input
file, row, folder or option) prints one line `egrsd COMMAND: error: ...` and exits 2; anything else is a bug
and propagates with its full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from .config.schema import ConfigError
from .utils.errors import UserError

# Order = order in `egrsd --help`. A module that is absent is skipped: no subcommand that does nothing.
COMMAND_MODULES = (
    "egrsd_megatron.config.commands",  # egrsd config show
    "egrsd_megatron.data.commands",  # egrsd data synth | prepare
    "egrsd_megatron.checkpoint.commands",  # egrsd convert hf-to-megatron | megatron-to-hf
    "egrsd_megatron.trainer.commands",  # egrsd train
    "egrsd_megatron.eval.commands",  # egrsd eval | frontier | curves
    "egrsd_megatron.planner.commands",  # egrsd plan
    "egrsd_megatron.experiment.commands",  # egrsd experiment | inspect
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egrsd", description="EGRSD / CL-EGRSD self-distillation on Megatron-Core")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"egrsd {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"egrsd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
