"""cli.py: a user error is one line and exit 2; anything else (a bug) keeps its full traceback."""

from __future__ import annotations

import pytest

from egrsd_megatron.cli import main
from egrsd_megatron.data import commands as data_commands
from egrsd_megatron.utils.errors import InputError, MissingInputError


def test_user_errors_are_one_line(tmp_path, capsys):
    # A real one: synth refuses --min-steps 0 (InputError) and a missing benchmark source (MissingInputError).
    assert main(["data", "synth", "--n", "2", "--out", str(tmp_path / "x.jsonl"), "--min-steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("egrsd data: error: need 1 <= min_steps") and err.count("\n") == 1
    assert "Traceback" not in err
    assert main(["data", "prepare", "gsm8k", "--src", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and err.count("\n") == 1
    # Config errors too.
    assert main(["config", "show", "tiny_cpu", "train.stepz=9"]) == 2
    assert "config error" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [ValueError("a bug"), FileNotFoundError("a bug"), KeyError("a bug")])
def test_a_bug_is_not_a_user_error(monkeypatch, tmp_path, exc):
    """A plain ValueError / FileNotFoundError from inside a command is a bug: it propagates (traceback)."""

    def broken(args):
        raise exc

    monkeypatch.setattr(data_commands, "_synth", broken)
    with pytest.raises(type(exc), match="a bug"):
        main(["data", "synth", "--n", "1", "--out", str(tmp_path / "x.jsonl")])


@pytest.mark.parametrize("exc", [InputError("bad row 3"), MissingInputError("no such file x")])
def test_declared_user_error_types(monkeypatch, tmp_path, capsys, exc):
    def user_mistake(args):
        raise exc

    monkeypatch.setattr(data_commands, "_synth", user_mistake)
    assert main(["data", "synth", "--n", "1", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert capsys.readouterr().err == f"egrsd data: error: {exc}\n"
