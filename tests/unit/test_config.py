"""Config system: YAML inheritance, key=value overrides, typed validation, and every error path."""
from __future__ import annotations

import pytest

from egrsd_megatron.config import ConfigError, LossConfig, load_config, to_yaml


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_chain_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  steps: 10\n  seed: 7\nloss:\n  name: grpo\n")
    write(tmp_path / "mid.yaml", "defaults: [base]\ntrain:\n  steps: 20\nrollout:\n  group_size: 4\n")
    child = write(tmp_path / "child.yaml", "defaults: [mid.yaml]\nloss:\n  name: egrsd\n")
    cfg = load_config(child, ["train.seed=3", "loss.g_min=0.3", "rollout.stop=['</s>']"])
    assert cfg.train.steps == 20          # mid overrides base
    assert cfg.train.seed == 3            # command line overrides everything
    assert cfg.loss.name == "egrsd"       # child overrides base
    assert cfg.loss.g_min == 0.3 and isinstance(cfg.loss, LossConfig)
    assert cfg.rollout.group_size == 4 and cfg.rollout.stop == ["</s>"]
    assert cfg.loss.eps_w == 0.2          # untouched default from the dataclass


def test_shipped_configs_load_and_show():
    for name in ("base", "tiny_cpu", "demo_cpu", "qwen3_8b", "qwen3_4b"):
        cfg = load_config(name)
        assert "loss:" in to_yaml(cfg)
    assert load_config("qwen3_8b").parallel.tp == 8


def test_unknown_key_names_file_and_closest_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "loss:\n  g_mn: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'loss.g_mn'; did you mean 'loss.g_min'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    bad = write(tmp_path / "t.yaml", "train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"t.yaml: config key 'train.steps' has the wrong type.*Integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"'loss.g_min' has the wrong type"):
        load_config(None, ["loss.g_min=abc"])


def test_value_checks_name_the_key():
    for override, key in [("loss.g_min=1.5", "loss.g_min"), ("loss.eps_w=-1", "loss.eps_w"),
                          ("loss.window=0", "loss.window"), ("loss.name=ppo", "loss.name"),
                          ("teacher.mode=ema", "teacher.mode"), ("loss.h_ref=quantile:2", "loss.h_ref")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    loop = write(tmp_path / "a.yaml", "defaults: [a]\n")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(loop)
    notmap = write(tmp_path / "l.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(notmap)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["steps"])


def test_config_show_cli(capsys):
    from egrsd_megatron.cli import main
    assert main(["config", "show", "tiny_cpu", "train.steps=9"]) == 0
    out = capsys.readouterr().out
    assert "steps: 9" in out and "preset: qwen3_tiny_chat" in out
    assert main(["config", "show", "tiny_cpu", "train.stepz=9"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
