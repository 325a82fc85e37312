"""Config system: YAML inheritance, key=value overrides, typed validation, and every error path."""

from __future__ import annotations

import dataclasses

import pytest

from egrsd_megatron.config import ConfigError, GateConfig, LossConfig, load_config, to_yaml
from egrsd_megatron.config.schema import literal_choices
from egrsd_megatron.losses import FAMILY


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_chain_file_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", "train:\n  steps: 10\n  seed: 7\nloss:\n  name: grpo\n")
    write(tmp_path / "mid.yaml", "defaults: [base]\ntrain:\n  steps: 20\nrollout:\n  group_size: 4\n")
    child = write(tmp_path / "child.yaml", "defaults: [mid.yaml]\nloss:\n  name: egrsd\n")
    cfg = load_config(child, ["train.seed=3", "loss.gate.g_min=0.3", "rollout.stop=['</s>']"])
    assert cfg.train.steps == 20  # mid overrides base
    assert cfg.train.seed == 3  # command line overrides everything
    assert cfg.loss.name == "egrsd"  # child overrides base
    assert cfg.loss.gate.g_min == 0.3 and isinstance(cfg.loss, LossConfig) and isinstance(cfg.loss.gate, GateConfig)
    assert cfg.rollout.group_size == 4 and cfg.rollout.stop == ["</s>"]
    assert cfg.loss.ratio.eps_w == 0.2  # untouched default from the dataclass
    assert cfg.loss.gate.tau == 1.0  # ... also next to an overridden key of the same section


def test_shipped_configs_load_and_show():
    for name in ("base", "tiny_cpu", "demo_cpu", "qwen3_8b", "qwen3_4b"):
        cfg = load_config(name)
        assert "loss:" in to_yaml(cfg)
    assert load_config("qwen3_8b").parallel.tp == 8


def test_unknown_key_names_file_and_closest_key(tmp_path):
    bad = write(tmp_path / "bad.yaml", "loss:\n  gate:\n    g_mn: 0.3\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown config key 'loss.gate.g_mn'; did you mean "
        r"'loss.gate.g_min'",
    ):
        load_config(bad)
    # a misspelt leaf one level too high is pointed at its section
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.g_mn'; did you mean 'loss.gate.g_min'"):
        load_config(None, ["loss.g_mn=0.3"])
    with pytest.raises(ConfigError, match=r"command line: unknown config key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    bad = write(tmp_path / "t.yaml", "train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"t.yaml: config key 'train.steps' has the wrong type.*Integer"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"'loss.gate.g_min' has the wrong type"):
        load_config(None, ["loss.gate.g_min=abc"])


def test_value_checks_name_the_key():
    for override, key in [
        ("loss.gate.g_min=1.5", "loss.gate.g_min"),
        ("loss.ratio.eps_w=-1", "loss.ratio.eps_w"),
        ("loss.lookahead.window=0", "loss.lookahead.window"),
        ("loss.name=ppo", "loss.name"),
        ("teacher.mode=ema", "teacher.mode"),
        ("loss.gate.h_ref=quantile:2", "loss.gate.h_ref"),
        ("loss.opsd.beta=1", "loss.opsd.beta"),
        ("loss.clip.eps_lo=-0.1", "loss.clip.eps_lo"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


# Every knob that moved into a section, with its new place (issue 14): the old flat key must say where it went.
MOVED = {
    "eps_w": "ratio",
    "lam": "ratio",
    "kind": "gate",
    "g_min": "gate",
    "tau": "gate",
    "h_ref": "gate",
    "window": "lookahead",
    "stat": "lookahead",
    "eps_lo": "clip",
    "eps_hi": "clip",
    "signal": "opsd",
    "beta": "opsd",
}


@pytest.mark.parametrize("key,section", MOVED.items())
def test_old_flat_loss_key_names_its_new_place(tmp_path, key, section):
    new = f"loss.{section}.{key}"
    assert key in {f.name for f in dataclasses.fields(getattr(LossConfig(), section))}
    with pytest.raises(ConfigError, match=rf"command line: unknown config key 'loss.{key}': it lives at '{new}'"):
        load_config(None, [f"loss.{key}=1"])
    old = write(tmp_path / "old.yaml", f"loss:\n  name: egrsd\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"old.yaml: unknown config key 'loss.{key}': it lives at '{new}'"):
        load_config(old)


@pytest.mark.parametrize(
    "override,key,choices",
    [
        ("loss.gate.kind=cosine", "loss.gate.kind", "exp, linear"),
        ("loss.lookahead.stat=median", "loss.lookahead.stat", "mean, max"),
        ("loss.opsd.signal=forward_kl", "loss.opsd.signal", "sampled, reverse_kl, jsd"),
        ("loss.aggregation=sum", "loss.aggregation", "token_mean, seq_mean_token_mean"),
    ],
)
def test_literal_value_names_key_and_choices(tmp_path, override, key, choices):
    value = override.split("=", 1)[1]
    msg = rf"config key '{key}': got '{value}'; expected one of {choices}$"
    with pytest.raises(ConfigError, match="command line: " + msg):
        load_config(None, [override])
    *path, leaf = key.split(".")
    yaml_text = "".join("  " * i + f"{p}:\n" for i, p in enumerate(path)) + "  " * len(path) + f"{leaf}: {value}\n"
    with pytest.raises(ConfigError, match="lit.yaml: " + msg):
        load_config(write(tmp_path / "lit.yaml", yaml_text))


def test_nested_loss_keys_from_yaml_and_command_line(tmp_path):
    f = write(
        tmp_path / "n.yaml",
        "loss:\n  name: opsd\n  opsd:\n    signal: jsd\n  gate:\n    kind: linear\n"
        "    h_ref: quantile:0.9\n  clip:\n    eps_hi: 0.3\n",
    )
    cfg = load_config(f, ["loss.opsd.beta=0.25", "loss.lookahead.stat=max", "loss.ratio.lam=0.5"])
    loss = cfg.loss
    assert (loss.name, loss.opsd.signal, loss.opsd.beta) == ("opsd", "jsd", 0.25)
    assert (loss.gate.kind, loss.gate.h_ref, loss.gate.g_min) == ("linear", "quantile:0.9", 0.2)
    assert (loss.clip.eps_lo, loss.clip.eps_hi, loss.lookahead.stat, loss.ratio.lam) == (0.2, 0.3, "max", 0.5)
    assert "  gate:\n    kind: linear\n" in to_yaml(cfg)  # `config show` prints the nesting


def test_every_loss_knob_has_a_one_line_help_and_literal_defaults_are_allowed():
    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            yield f"{prefix}{f.name}", f
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from walk(f.default_factory, f"{prefix}{f.name}.")

    knobs = dict(walk(LossConfig, "loss."))
    assert {"loss.gate.g_min", "loss.opsd.signal", "loss.kl_coef"} <= set(knobs)
    for key, f in knobs.items():
        help_text = f.metadata.get("help", "")
        assert help_text and "\n" not in help_text, f"{key}: needs a one-line help"
    defaults = LossConfig()
    for section in ("gate", "lookahead", "opsd"):
        sec = getattr(defaults, section)
        for name, choices in literal_choices(type(sec)).items():
            assert getattr(sec, name) in choices


def test_loss_name_is_validated_against_the_registry(monkeypatch):
    with pytest.raises(ConfigError, match="loss.name.*expected one of " + ", ".join(FAMILY)):
        load_config(None, ["loss.name=dpo"])
    monkeypatch.setitem(FAMILY, "dpo", FAMILY["grpo"])  # registering a name is all validation needs
    assert load_config(None, ["loss.name=dpo"]).loss.name == "dpo"


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


def test_rlsd_lam_schedule_is_linear_then_flat():
    from egrsd_megatron.config.schema import RatioConfig

    r = RatioConfig(lam=0.5, lam_end=0.0, lam_steps=50)
    assert [r.lam_at(t) for t in (0, 25, 50, 80)] == [0.5, 0.25, 0.0, 0.0]
    assert RatioConfig(lam=0.7).lam_at(123) == 0.7  # no schedule: constant
    with pytest.raises(ConfigError, match="loss.ratio.lam_steps"):
        load_config(None, ["loss.ratio.lam_end=0.0"])
    with pytest.raises(ConfigError, match="loss.ratio.lam_end"):
        load_config(None, ["loss.ratio.lam_end=1.5", "loss.ratio.lam_steps=3"])
