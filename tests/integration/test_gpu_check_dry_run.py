"""bench/gpu_check.py --cpu-dry-run: the GPU script's own code runs end to end on the CPU at toy sizes, so a
GPU session spends its minutes measuring, not debugging the script (the measurements need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_runs_on_cpu_as_a_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "TMPDIR": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    names = [c["name"] for c in res["checks"]]
    assert all(c["ok"] for c in res["checks"]), [c for c in res["checks"] if not c["ok"]]
    for part in ("token_stats", "fwd+bwd", "MasterWeightAdamW", "async torch_dist save"):
        assert any(part in n for n in names), (part, names)
