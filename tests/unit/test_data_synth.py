"""Synthetic problems (checked by re-doing every worked step independently), `egrsd data synth|prepare`,
and evaluation-set conversion from their public layouts."""

import json
import operator
import re

import pytest

from egrsd_megatron.cli import main as cli
from egrsd_megatron.data.benchmarks import BENCHMARKS, prepare_benchmark
from egrsd_megatron.data.synth import generate_problems

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.mark.parametrize("lo,hi", [(1, 1), (1, 2), (3, 4)])
def test_worked_solutions_are_correct(lo, hi):
    probs = generate_problems(200, seed=11, min_steps=lo, max_steps=hi)
    seen_steps = set()
    for p in probs:
        lines = p["solution"].split("\n")
        eqs = [m.groups() for m in map(_EQ.search, lines) if m]
        assert lo <= len(eqs) <= hi, p
        seen_steps.add(len(eqs))
        prev = None
        for a, op, b, c in eqs:
            assert _OPS[op](int(a), int(b)) == int(c), p  # each step's arithmetic
            assert prev is None or int(a) == prev or op == "-" and int(b) == prev, p  # chained
            prev = int(c)
        assert p["answer"] == str(prev) and int(prev) >= 0
        assert lines[-1] == f"#### {prev}" and lines[-2] == f"So the answer is \\boxed{{{prev}}}."
        assert p["problem"].endswith("?") and p["answer"] not in ("", None)
    assert seen_steps == set(range(lo, hi + 1))


def test_deterministic_and_prefix_stable():
    a = generate_problems(50, seed=5)
    assert a == generate_problems(50, seed=5)
    assert a[:20] == generate_problems(20, seed=5)
    assert a != generate_problems(50, seed=6)
    assert len({p["problem"] for p in a}) > 40
    with pytest.raises(ValueError, match="min_steps"):
        generate_problems(3, 0, min_steps=3, max_steps=2)


def test_synth_cli_writes_loadable_jsonl(tmp_path, capsys):
    from egrsd_megatron.config.schema import DataConfig
    from egrsd_megatron.data import load_problems

    out = tmp_path / "s.jsonl"
    assert cli(["data", "synth", "--n", "12", "--seed", "3", "--out", str(out), "--max-steps", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate_problems(12, 3, 1, 3)
    assert len(load_problems(str(out), DataConfig())) == 12
    assert cli(["data", "synth", "--n", "2", "--out", str(tmp_path / "x.jsonl"), "--min-steps", "0"]) == 2
    assert not (tmp_path / "x.jsonl").exists()
    assert "min_steps" in capsys.readouterr().err


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_prepare_public_layouts(tmp_path):
    cases = {
        "gsm8k": (
            [{"question": "Q1", "answer": "3 apples <<1+2=3>>3.\n#### 1,003"}],
            {"problem": "Q1", "answer": "1003", "solution": "3 apples 3.", "id": "gsm8k-1"},
        ),
        "math500": (
            [
                {
                    "problem": "P",
                    "solution": "so \\boxed{\\frac{1}{2}}",
                    "answer": "\\frac{1}{2}",
                    "unique_id": "test/x.json",
                }
            ],
            {"problem": "P", "answer": "\\frac{1}{2}", "solution": "so \\boxed{\\frac{1}{2}}", "id": "test/x.json"},
        ),
        "aime24": (
            [{"ID": "2024-I-1", "Problem": "P", "Solution": "S", "Answer": 204}],
            {"problem": "P", "answer": "204", "solution": "S", "id": "2024-I-1"},
        ),
        "aime25": ([{"question": "P", "answer": "70"}], {"problem": "P", "answer": "70", "id": "aime25-1"}),
        "minerva": (
            [{"problem": "P", "solution": "x \\boxed{4\\times10^{3}} y"}],
            {"problem": "P", "answer": "4\\times10^{3}", "solution": "x \\boxed{4\\times10^{3}} y", "id": "minerva-1"},
        ),
        "hmmt25": (
            [{"problem_idx": 7, "problem": "P", "answer": "\\sqrt{2}"}],
            {"problem": "P", "answer": "\\sqrt{2}", "id": "7"},
        ),
    }
    for name, (rows, expected) in cases.items():
        out = tmp_path / f"{name}.out.jsonl"
        assert prepare_benchmark(name, _write(tmp_path, f"{name}.jsonl", rows), str(out)) == 1
        got = json.loads(out.read_text())
        assert got == dict(expected, benchmark=name), name
    assert set(BENCHMARKS) == {"aime24", "aime25", "math500", "gsm8k", "minerva", "hmmt25", "synth"}


def test_prepare_errors_write_nothing(tmp_path, capsys):
    src = _write(
        tmp_path, "g.jsonl", [{"question": "Q", "answer": "#### 1"}, {"question": "Q2", "answer": "no hashes"}]
    )
    out = tmp_path / "g.out.jsonl"
    with pytest.raises(ValueError, match=r"g.jsonl line 2: gsm8k field 'answer' has no '#### N'"):
        prepare_benchmark("gsm8k", src, str(out))
    assert not out.exists()
    src2 = _write(tmp_path, "m.jsonl", [{"problem": "P", "solution": "no box"}])
    assert cli(["data", "prepare", "math500", "--src", src2, "--out", str(out)]) == 2
    assert "m.jsonl line 1: no answer for math500" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match="unknown benchmark"):
        prepare_benchmark("mmlu", src, str(out))
