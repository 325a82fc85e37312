#!/usr/bin/env python
"""Thin entry: `python recipes/convert.py hf-to-megatron|megatron-to-hf ...` == `egrsd convert ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from egrsd_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
