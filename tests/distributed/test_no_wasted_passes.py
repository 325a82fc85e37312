"""No wasted work (issue 16): a loss that reads no teacher input (grpo) runs no teacher pass.

The tiny training run of test_trainer.py at TP=1 (one spawned rank), with the teacher's forward calls
counted by a hook on the teacher model:
- grpo (default): no teacher copy is built (losses.weight_copies) and the student model runs exactly
  its own pass (one forward per micro-batch per step), so no teacher pass ran on it either; its losses
  and grad norms are BITWISE those of grpo with teacher.log_entropy=true, which runs the teacher pass
  (the teacher's statistics never entered grpo's loss, and the student log-prob of the one-distribution
  token_stats_one is the same arithmetic as the fused call's, tests/unit/test_vocab_parallel.py); only the
  teacher-entropy metrics are missing.
- grpo with teacher.log_entropy=true and cl_egrsd: one teacher forward per micro-batch per step.
"""

from __future__ import annotations

import json
import os

from egrsd_megatron.config import load_config
from egrsd_megatron.testing import run_distributed
from tests.distributed.test_trainer import tiny_overrides, write_data

RUNS = {
    "grpo": {"loss.name": "grpo"},
    "grpo_log_entropy": {"loss.name": "grpo", "teacher.log_entropy": "true"},
    "cl_egrsd": {"loss.name": "cl_egrsd"},
}


def count_teacher_forwards(rank: int, world: int, data: str, out: str) -> dict:
    from egrsd_megatron.trainer.loop import Trainer

    res = {}
    for name, extra in RUNS.items():
        run = os.path.join(out, name)
        trainer = Trainer(load_config(None, tiny_overrides(data, run, **extra)))
        calls, student_calls = [], []
        res[name] = {"copy": trainer.teacher.copy is not None}
        if trainer.teacher.copy is not None:  # teacher.mode=frozen: its own module to count
            trainer.teacher.copy.register_forward_hook(lambda mod, args, output, calls=calls: calls.append(1))
        trainer.model.register_forward_hook(lambda mod, args, output, c=student_calls: c.append(1))
        assert trainer.run() == 0
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        res[name].update(forwards=len(calls), student_forwards=len(student_calls), rows=rows)
    return res


def test_grpo_runs_no_teacher_pass(tmp_path):
    data = write_data(str(tmp_path / "train.jsonl"))
    res = run_distributed(count_teacher_forwards, 1, data, str(tmp_path), timeout=600)[0]
    cfg = load_config(None, tiny_overrides(data, str(tmp_path / "cfg")))
    steps = cfg.train.steps
    per_step = cfg.train.prompts_per_step * cfg.rollout.group_size // cfg.parallel.micro_batch_size
    assert not res["grpo"]["copy"] and res["grpo_log_entropy"]["copy"] and res["cl_egrsd"]["copy"]
    assert res["grpo"]["forwards"] == 0
    assert {r["student_forwards"] for r in res.values()} == {steps * per_step}  # no teacher pass on the student
    assert res["grpo_log_entropy"]["forwards"] == res["cl_egrsd"]["forwards"] == steps * per_step
    plain, logged = res["grpo"]["rows"], res["grpo_log_entropy"]["rows"]
    assert len(plain) == len(logged) == steps
    for a, b in zip(plain, logged):
        for key in ("loss", "grad_norm", "accuracy", "response_length"):
            assert a[key] == b[key], (key, a[key], b[key])
        assert "teacher_entropy_mean" not in a and "spike_count" not in a
        assert "teacher_entropy_mean" in b and "teacher_entropy_p90" in b
        assert a["time/teacher"] == 0.0 and b["time/teacher"] > 0.0
    assert any(abs(r["loss"]) > 1e-8 for r in plain), "a zero loss would make the comparison vacuous"
