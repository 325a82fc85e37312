"""README.md's CPU commands run as written, in order, on tiny inputs, so the README cannot drift from the code.

Every line of the README's ```bash blocks that starts with `egrsd` is run (through the same Python, in a
fresh folder that holds only `conf/` and the inputs below), except lines marked `(cluster)` in their
comment. The only adaptations, all through documented options, keep it short:
  egrsd train ...  + train.steps=2 (the README's step_00000004 paths become step_00000002)
  egrsd eval ...   + --limit 2 --max-new-tokens 16 --no-progress
Inputs the README assumes the user has: gsm8k_test.jsonl (a downloaded GSM8K test file; two rows here) and
my_exp.yaml (their own experiment file; here the quick experiment's tiny settings, out_dir runs/my_exp).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from typing import List

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
# The commands the README must keep showing (a README that drops one fails here, not silently).
MUST_COVER = {
    "data synth",
    "data prepare",
    "train",
    "convert megatron-to-hf",
    "convert hf-to-megatron",
    "eval",
    "frontier",
    "curves",
    "plan",
    "config show",
    "experiment",
    "inspect",
}
TRAIN_STEPS = 2


def readme_commands(text: str) -> List[List[str]]:
    """argv of each `egrsd` line in the ```bash blocks, in order, without `(cluster)` lines."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if "(cluster)" in line:
                continue
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "egrsd":
                out.append(argv)
    return out


def adapt(argv: List[str]) -> List[str]:
    argv = [a.replace("step_00000004", f"step_{TRAIN_STEPS:08d}") for a in argv]
    if argv[1] == "train":
        return argv + [f"train.steps={TRAIN_STEPS}"]
    if argv[1] == "eval":
        return argv + ["--limit", "2", "--max-new-tokens", "16", "--no-progress"]
    return argv


def subcommand(argv: List[str]) -> str:
    return " ".join(argv[1:3]) if argv[1] in ("data", "convert", "config") else argv[1]


def test_readme_commands_parse_and_cover_the_cli():
    cmds = readme_commands(open(README).read())
    assert MUST_COVER <= {subcommand(a) for a in cmds}, MUST_COVER - {subcommand(a) for a in cmds}


@pytest.mark.slow
def test_readme_cpu_commands_run_as_written(tmp_path):
    os.symlink(os.path.join(REPO, "conf"), tmp_path / "conf")
    with open(tmp_path / "gsm8k_test.jsonl", "w") as f:
        for a, b in ((2, 3), (4, 4)):
            f.write(
                json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n"
            )
    quick = open(os.path.join(REPO, "conf", "experiment_quick.yaml")).read()
    quick = re.sub(r"(?ms)^per_method:.*?(?=^\S)", "", quick)  # the README picks methods and seeds itself
    quick = quick.replace("out_dir: runs/experiment_quick", "out_dir: runs/my_exp")
    (tmp_path / "my_exp.yaml").write_text(quick)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv in readme_commands(open(README).read()):
        cmd = [sys.executable, "-m", "egrsd_megatron.cli", *adapt(argv)[1:]]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README command failed: {shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # What the chain promised exists: the trained run, both conversions, both evaluations, the plots.
    for path in (
        "runs/tiny_cpu/metrics.jsonl",
        "hf/tiny_egrsd/config.json",
        "ckpt/tiny_tp2/egrsd_checkpoint.json",
        "results/tiny_hf/summary.json",
        "results/tiny_egrsd/summary.json",
        "frontier.png",
        "curves.png",
        "runs/my_exp/summary.json",
    ):
        assert (tmp_path / path).exists(), path
