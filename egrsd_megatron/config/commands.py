"""`egrsd config show CONFIG [key=value ...]`: print the resolved, validated config."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("config", help="inspect configs")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config (defaults, file, overrides)")
    show.add_argument("config", help="YAML file in conf/ or a path")
    show.add_argument("overrides", nargs="*", help="section.key=value")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from .loader import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0
