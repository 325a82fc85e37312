"""Problem datasets from local jsonl, parquet, or a `datasets` folder (save_to_disk), validated row by row.

Every row needs a non-empty string `problem`, a non-empty `answer` (string, or int/float which is turned
into its string form), and, for training, a non-empty string `solution` (the teacher's privileged
context). Field names come from DataConfig. Errors name the file, the row (1-based line number for
jsonl, 1-based row number otherwise) and the field. Prompts longer than `data.max_prompt_tokens`
(student and teacher prompt, when a prompt builder is given) are skipped and counted, or fail, per
`data.on_overlong`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq

from ..config.schema import DataConfig
from ..utils.errors import InputError, MissingInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    problem: str
    solution: Optional[str]  # privileged context; None when the file has none (evaluation sets)
    answer: str  # what the verifier compares against
    index: int  # 0-based row in the source file
    source: str  # the source file (or folder)


class ProblemSet(Sequence[Problem]):
    """The kept problems, plus what was skipped for length (`skipped`, `skipped_rows`)."""

    def __init__(self, problems: List[Problem], path: str, skipped_rows: Optional[List[Tuple[int, int]]] = None):
        self.problems = problems
        self.path = path
        self.skipped_rows = skipped_rows or []  # (1-based row, prompt tokens)

    @property
    def skipped(self) -> int:
        return len(self.skipped_rows)

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i):  # type: ignore[override]
        return self.problems[i]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __repr__(self) -> str:
        return f"ProblemSet({self.path!r}, {len(self)} problems, {self.skipped} skipped as overlong)"


class DataError(InputError):
    """A bad dataset row or file; the message names the file, row and field."""


def _iter_rows(path: str) -> Iterator[Tuple[str, Any]]:
    """Yield (row label, record) for jsonl | json | parquet | datasets folder."""
    if os.path.isdir(path):
        import datasets  # seconds to import; only a `datasets` folder (save_to_disk) needs it

        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a `datasets` folder saved with save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise DataError(
                    f"{path}: a DatasetDict with splits {sorted(ds)}; point at one split's folder "
                    f"(e.g. {os.path.join(path, sorted(ds)[0])})"
                )
            ds = next(iter(ds.values()))
        for i, rec in enumerate(ds):
            yield f"row {i + 1}", rec
        return
    if not os.path.exists(path):
        raise MissingInputError(f"dataset {path!r} does not exist")
    low = path.lower()
    if low.endswith(".parquet"):
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i + 1}", rec
    elif low.endswith((".jsonl", ".jsonl.gz")) or low.endswith(".json"):
        if low.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                head = f.read(1)
                while head and head.isspace():
                    head = f.read(1)
            if head == "[":  # a JSON array of records
                with open(path, encoding="utf-8") as f:
                    try:
                        recs = json.load(f)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: invalid JSON ({e})") from e
                for i, rec in enumerate(recs):
                    yield f"record {i + 1}", rec
                return
        opener = open
        if low.endswith(".gz"):
            opener = gzip.open  # type: ignore[assignment]
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
                yield f"line {lineno}", rec
    else:
        raise DataError(f"{path}: unknown dataset format; expected .jsonl, .json, .parquet or a `datasets` folder")


def _text_field(
    rec: Dict[str, Any], key: str, cfg_key: str, where: str, allow_numbers: bool, required: bool
) -> Optional[str]:
    if key not in rec or rec[key] is None:
        if not required:
            return None
        raise DataError(
            f"{where}: missing field '{key}' (present: {sorted(rec)}); set data.{cfg_key} if the "
            f"file names it differently"
        )
    v = rec[key]
    if isinstance(v, bool) or not (isinstance(v, str) or (allow_numbers and isinstance(v, (int, float)))):
        kinds = "a string or a number" if allow_numbers else "a string"
        raise DataError(f"{where}: field '{key}' must be {kinds}, got {type(v).__name__}")
    if isinstance(v, float):
        if not math.isfinite(v):
            raise DataError(f"{where}: field '{key}' is {v}; expected a finite number")
        v = str(int(v)) if v.is_integer() else repr(v)
    v = str(v)
    if not v.strip():
        if not required:
            return None
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def load_problems(
    path: str, cfg: DataConfig, tokenizer: Any = None, prompt_builder: Any = None, require_solution: bool = True
) -> ProblemSet:
    """Read and validate problems. require_solution=False for evaluation sets without solutions.

    Length check: with a prompt builder, max(len(student prompt), len(teacher prompt)) in tokens (the teacher
    prompt only when the row has a solution); with only a tokenizer, the tokens of the problem text.
    """
    cfg.validate()
    problems: List[Problem] = []
    skipped: List[Tuple[int, int]] = []
    source = str(path)
    for i, (label, rec) in enumerate(_iter_rows(source)):
        where = f"{source} {label}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object with fields, got {type(rec).__name__}")
        prob = _text_field(rec, cfg.problem_field, "problem_field", where, allow_numbers=False, required=True)
        sol = _text_field(
            rec, cfg.solution_field, "solution_field", where, allow_numbers=False, required=require_solution
        )
        ans = _text_field(rec, cfg.answer_field, "answer_field", where, allow_numbers=True, required=True)
        p = Problem(problem=prob, solution=sol, answer=ans.strip(), index=i, source=source)  # type: ignore[arg-type]
        n_tok = _prompt_tokens(p, tokenizer, prompt_builder)
        if n_tok is not None and n_tok > cfg.max_prompt_tokens:
            if cfg.on_overlong == "fail":
                raise DataError(
                    f"{where}: prompt is {n_tok} tokens, over data.max_prompt_tokens="
                    f"{cfg.max_prompt_tokens}; raise the limit or set data.on_overlong=skip"
                )
            skipped.append((i + 1, n_tok))
            continue
        problems.append(p)
    if skipped:
        log.warning(
            "%s: skipped %d overlong problem(s) (> %d prompt tokens)", source, len(skipped), cfg.max_prompt_tokens
        )
    if not problems:
        raise DataError(f"{source}: no usable problems ({len(skipped)} skipped as overlong)")
    return ProblemSet(problems, source, skipped)


def _prompt_tokens(p: Problem, tokenizer: Any, prompt_builder: Any) -> Optional[int]:
    if prompt_builder is not None:
        n = len(prompt_builder.student_prompt_ids(p))
        if p.solution:
            n = max(n, len(prompt_builder.teacher_prompt_ids(p)))
        return n
    if tokenizer is not None:
        return len(tokenizer.encode(p.problem, add_special_tokens=False))
    return None
