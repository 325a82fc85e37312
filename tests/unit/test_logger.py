"""trainer/logger.py: train.log_every, and one plain line per logged step when the output is not a terminal."""

from __future__ import annotations

import json

import pytest

from egrsd_megatron.config import ConfigError, load_config
from egrsd_megatron.trainer import logger as logger_mod
from egrsd_megatron.trainer.logger import StepLogger


def _cfg(**kw):
    over = {"logging.tensorboard": "false", **kw}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def _log(tmp_path, steps, **kw):
    lg = StepLogger(_cfg(**kw), str(tmp_path), steps, 0, enabled=True)
    for s in range(steps):
        lg.log_step(s, {"loss": 0.5 + s, "accuracy": 0.25})
    lg.close()
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_not_a_terminal_one_line_per_step_no_bar(tmp_path, capsys):
    # pytest's capture is not a TTY: the CI / Slurm-log / `> file` case.
    rows = _log(tmp_path, 3)
    out, err = capsys.readouterr()
    assert "\r" not in out and "\r" not in err  # no carriage-return bar fragments
    assert err == ""  # the bar (tqdm writes to stderr) is not drawn
    lines = out.splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_log_every_thins_the_console_not_metrics_jsonl(tmp_path, capsys):
    rows = _log(tmp_path, 5, **{"train.log_every": 2})
    lines = capsys.readouterr().out.splitlines()
    # Steps 2 and 4, and the last step (5) so a run always ends with its final numbers.
    assert [ln.split(" |")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # every step, whatever log_every is
    assert rows[2]["loss"] == 2.5


def test_terminal_gets_a_bar(tmp_path, monkeypatch):
    monkeypatch.setattr(logger_mod, "interactive", lambda: True)
    lg = StepLogger(_cfg(), str(tmp_path), 2, 0, enabled=True)
    assert lg.bar is not None
    lg.close()


def test_log_every_below_one_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.log_every=0"):
        StepLogger(_cfg(**{"train.log_every": 0}), str(tmp_path), 2, 0, enabled=True)
