#!/usr/bin/env python
"""Thin entry for Slurm scripts: `python recipes/evaluate.py --model DIR --benchmarks ... --out DIR`
is `egrsd eval ...` (same arguments)."""

import sys

from egrsd_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
