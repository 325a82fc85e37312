"""Dataset loading from jsonl / json / parquet / datasets folder, and every validation error path."""

import json

import pytest

from egrsd_megatron.config.schema import DataConfig
from egrsd_megatron.data import DataError, Problem, load_problems

ROWS = [
    {"problem": "What is 2+3?", "solution": "2+3=5", "answer": "5"},
    {"problem": "What is 7*6?", "solution": "7*6=42", "answer": 42},
    {"problem": "Half of 1?", "solution": "1/2", "answer": "\\frac{1}{2}"},
]


def _jsonl(path, rows, blank_lines=False):
    text = "".join(json.dumps(r) + "\n" + ("\n" if blank_lines else "") for r in rows)
    path.write_text(text)
    return str(path)


def test_formats_agree(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, answer=str(r["answer"])) for r in ROWS]
    paths = [
        _jsonl(tmp_path / "a.jsonl", ROWS),
        str(tmp_path / "b.parquet"),
        str(tmp_path / "c.json"),
        str(tmp_path / "ds"),
    ]
    pq.write_table(pa.Table.from_pylist(rows), paths[1])
    (tmp_path / "c.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(rows).save_to_disk(paths[3])
    sets = [load_problems(p, DataConfig()) for p in paths]
    for ps, p in zip(sets, paths):
        assert [(x.problem, x.solution, x.answer, x.index) for x in ps] == [
            (r["problem"], r["solution"], r["answer"], i) for i, r in enumerate(rows)
        ]
        assert ps[0].source == p and ps.skipped == 0
    assert isinstance(sets[0][1], Problem) and sets[0][1].answer == "42"  # numbers become strings


def test_configurable_field_names(tmp_path):
    rows = [{"q": r["problem"], "ctx": r["solution"], "a": str(r["answer"])} for r in ROWS]
    ps = load_problems(
        _jsonl(tmp_path / "x.jsonl", rows), DataConfig(problem_field="q", solution_field="ctx", answer_field="a")
    )
    assert len(ps) == 3 and ps[2].solution == "1/2"


@pytest.mark.parametrize(
    "row,match",
    [
        ({"solution": "s", "answer": "1"}, r"line 3: missing field 'problem'.*data.problem_field"),
        ({"problem": "p", "answer": "1"}, r"line 3: missing field 'solution'"),
        ({"problem": "p", "solution": "s"}, r"line 3: missing field 'answer'"),
        ({"problem": "  ", "solution": "s", "answer": "1"}, r"line 3: field 'problem' is empty"),
        ({"problem": "p", "solution": "s", "answer": ""}, r"line 3: field 'answer' is empty"),
        ({"problem": 5, "solution": "s", "answer": "1"}, r"line 3: field 'problem' must be a string, got int"),
        ({"problem": "p", "solution": ["s"], "answer": "1"}, r"line 3: field 'solution' must be a string, got list"),
        ({"problem": "p", "solution": "s", "answer": True}, r"line 3: field 'answer' must be a string or a number"),
        ({"problem": "p", "solution": "s", "answer": float("nan")}, r"line 3: field 'answer' is nan"),
    ],
)
def test_row_errors_name_file_line_field(tmp_path, row, match):
    # a blank line 2 proves the count is of file lines (1-based), not of records
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_problems(str(path), DataConfig())
    assert str(path) in str(e.value)


def test_file_errors(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl line 2: invalid JSON"):
        load_problems(str(p), DataConfig())
    q = tmp_path / "arr.jsonl"
    q.write_text("[1, 2]\n")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        load_problems(str(q), DataConfig())
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"), DataConfig())
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown dataset format"):
        load_problems(str(tmp_path / "x.csv"), DataConfig())
    (tmp_path / "notds").mkdir()
    with pytest.raises(DataError, match="notds"):
        load_problems(str(tmp_path / "notds"), DataConfig())


def test_eval_sets_without_solution(tmp_path):
    rows = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": 2, "solution": ""}]
    path = _jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(DataError, match="missing field 'solution'"):
        load_problems(path, DataConfig())
    ps = load_problems(path, DataConfig(), require_solution=False)
    assert [p.solution for p in ps] == [None, None] and ps[1].answer == "2"


class _CharTok:
    """One token per character: lengths are easy to know exactly."""

    def encode(self, text, add_special_tokens=False):
        return list(range(len(text)))


def test_overlong_skip_and_fail(tmp_path):
    rows = [{"problem": "x" * n, "solution": "s", "answer": "1"} for n in (5, 50, 10, 51)]
    path = _jsonl(tmp_path / "l.jsonl", rows)
    ps = load_problems(path, DataConfig(max_prompt_tokens=10), tokenizer=_CharTok())
    assert [len(p.problem) for p in ps] == [5, 10] and ps.skipped == 2
    assert ps.skipped_rows == [(2, 50), (4, 51)] and [p.index for p in ps] == [0, 2]
    with pytest.raises(DataError, match=r"l.jsonl line 2: prompt is 50 tokens, over data.max_prompt_tokens=10"):
        load_problems(path, DataConfig(max_prompt_tokens=10, on_overlong="fail"), tokenizer=_CharTok())
    with pytest.raises(DataError, match="no usable problems"):
        load_problems(path, DataConfig(max_prompt_tokens=1), tokenizer=_CharTok())


def test_overlong_uses_teacher_prompt_with_builder(tmp_path):
    """With a prompt builder the limit applies to the longer (teacher) prompt, which carries the solution."""
    from egrsd_megatron.config.schema import PromptConfig
    from egrsd_megatron.data import PromptBuilder, load_tokenizer

    tok = load_tokenizer("qwen3")
    b = PromptBuilder(tok, PromptConfig())
    rows = [{"problem": "What is 1+1?", "solution": "one plus one " * k, "answer": "2"} for k in (1, 40)]
    path = _jsonl(tmp_path / "t.jsonl", rows)
    p0 = Problem(rows[0]["problem"], rows[0]["solution"], "2", 0, path)
    limit = len(b.teacher_prompt_ids(p0))
    ps = load_problems(path, DataConfig(max_prompt_tokens=limit), prompt_builder=b)
    assert len(ps) == 1 and ps.skipped_rows[0][0] == 2 and ps.skipped_rows[0][1] > limit
