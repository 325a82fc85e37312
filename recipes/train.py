#!/usr/bin/env python
"""Thin entry script for training (what the Slurm scripts launch): `python recipes/train.py CONFIG [k=v ...]`.

Same code path as `egrsd train`. Exit codes: 0 done, 2 bad config, 3 aborted on non-finite numerics,
42 preempted after saving a checkpoint (the Slurm launcher requeues the job).
"""

import sys

from egrsd_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
