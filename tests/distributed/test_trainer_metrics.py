"""The logged step metrics do not depend on parallel.micro_batch_size (trainer/metrics.py): a tiny run with
micro-batches of 1 and of 4 rollouts logs the same counts, quantile and means for its first step (same
weights, same per-rollout seeds, so the same rollouts)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from egrsd_megatron.testing import run_distributed
from egrsd_megatron.trainer.metrics import KINDS

from .test_trainer import _train, tiny_overrides, write_data

EPS32 = float(np.finfo(np.float32).eps)


def first_step(rank: int, world: int, mbs: int, data: str, out: str) -> dict:  # noqa: ARG001
    _train(tiny_overrides(data, out, **{"loss.name": "cl_egrsd", "train.steps": 1, "parallel.micro_batch_size": mbs}))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return json.loads(f.readline())


@pytest.mark.slow
def test_logged_metrics_do_not_depend_on_micro_batch_size(tmp_path):
    data = write_data(str(tmp_path / "train.jsonl"))
    one = run_distributed(first_step, 1, 1, data, str(tmp_path / "mbs1"), timeout=600)[0]
    four = run_distributed(first_step, 1, 4, data, str(tmp_path / "mbs4"), timeout=600)[0]
    assert one["accuracy"] == four["accuracy"] and one["response_length"] == four["response_length"]
    n = one["tokens"]
    assert n == 8 * one["response_length"]  # the step's token count, not a per-micro-batch mean of it
    for k, kind in KINDS.items():
        if k not in one:
            continue
        if kind.how in ("sum", "max") and k != "loss":
            assert one[k] == four[k], k
        else:
            # The per-token statistics come from forward passes of another batch shape, which may round
            # differently (GEMM blocking), by a few fp32 ulps of their magnitude M (log-probs and entropies
            # of a 2-layer model: |x| <= log V < 6 here, V = 320): a quantile moves by at most that, a mean of
            # N terms regrouped by ~N eps32 M more (see tests/unit/test_trainer_pieces.py).
            tol = (n + 4) * EPS32 * 6.0
            assert one[k] == pytest.approx(four[k], abs=tol, rel=0), (k, one[k], four[k])
