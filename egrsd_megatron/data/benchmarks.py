"""Evaluation sets: expected fields, the usual public layouts, and conversion to our jsonl fields.

Our fields (what `load_problems` reads): `problem` (str), `answer` (str, what the verifier compares),
optional `solution` (str, worked solution), plus `id` and `benchmark` for bookkeeping. See docs/data.md.
Each spec lists candidate column names for the common public copies of a set; the first present wins.
An answer that is only inside a solution (MATH style) is taken from the solution's last \\boxed{...};
GSM8K's answer is the number after "####" (its calculator annotations <<a*b=c>> are removed from the
solution).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..rewards.extract import last_boxed
from ..utils.atomic import atomic_write_text
from ..utils.errors import InputError
from .dataset import DataError, _iter_rows


def _gsm8k_answer(rec_answer: str) -> Tuple[Optional[str], Optional[str]]:
    """GSM8K 'answer' = rationale + '#### N' -> (answer N, rationale without <<...>> annotations)."""
    if "####" not in rec_answer:
        return None, None
    rationale, final = rec_answer.rsplit("####", 1)
    rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()
    return final.strip().replace(",", ""), rationale


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    description: str
    problem_keys: Tuple[str, ...]
    answer_keys: Tuple[str, ...]
    solution_keys: Tuple[str, ...] = ()
    id_keys: Tuple[str, ...] = ("id", "unique_id", "ID", "problem_idx", "idx")
    # (raw answer text) -> (answer, solution) for sets that pack both into one field
    split_answer: Optional[Callable[[str], Tuple[Optional[str], Optional[str]]]] = None
    layouts: Tuple[str, ...] = field(default_factory=tuple)


BENCHMARKS: Dict[str, BenchmarkSpec] = {
    s.name: s
    for s in [
        BenchmarkSpec(
            "aime24",
            "AIME 2024 (30 problems, integer answers 0-999)",
            ("problem", "Problem", "question"),
            ("answer", "Answer"),
            ("solution", "Solution"),
            layouts=(
                "Problem/Solution/Answer (e.g. Maxwell-Jia/AIME_2024)",
                "problem/solution/answer/id (e.g. HuggingFaceH4/aime_2024)",
            ),
        ),
        BenchmarkSpec(
            "aime25",
            "AIME 2025 (30 problems, integer answers 0-999)",
            ("problem", "Problem", "question"),
            ("answer", "Answer"),
            ("solution", "Solution"),
            layouts=(
                "problem/answer (e.g. yentinglin/aime_2025, MathArena/aime_2025)",
                "question/answer (e.g. opencompass/AIME2025)",
            ),
        ),
        BenchmarkSpec(
            "math500",
            "MATH-500 (500 competition problems, LaTeX answers)",
            ("problem",),
            ("answer",),
            ("solution",),
            layouts=(
                "problem/solution/answer/subject/level/unique_id (HuggingFaceH4/MATH-500)",
                "problem/solution (answer taken from the solution's last \\boxed{})",
            ),
        ),
        BenchmarkSpec(
            "gsm8k",
            "GSM8K test (1319 grade-school word problems, integer answers)",
            ("question", "problem"),
            ("answer",),
            (),
            split_answer=_gsm8k_answer,
            layouts=("question/answer where answer = rationale + '#### N' (openai/gsm8k, main)",),
        ),
        BenchmarkSpec(
            "minerva",
            "Minerva Math / OCWCourses (272 STEM problems)",
            ("problem", "question"),
            ("answer", "final_answer"),
            ("solution",),
            layouts=(
                "problem/solution (answer from the solution's last \\boxed{})",
                "question/answer (e.g. math-ai/minervamath)",
            ),
        ),
        BenchmarkSpec(
            "hmmt25",
            "HMMT February 2025 (30 problems, LaTeX answers)",
            ("problem", "Problem", "question"),
            ("answer", "Answer"),
            ("solution",),
            layouts=("problem_idx/problem/answer (e.g. MathArena/hmmt_feb_2025)",),
        ),
        BenchmarkSpec(
            "synth",
            "egrsd synthetic arithmetic problems (`egrsd data synth`)",
            ("problem",),
            ("answer",),
            ("solution",),
            layouts=("problem/solution/answer",),
        ),
    ]
}


def _first(rec: Dict[str, Any], keys: Tuple[str, ...]) -> Tuple[Optional[str], Any]:
    for k in keys:
        if k in rec and rec[k] is not None and str(rec[k]).strip():
            return k, rec[k]
    return None, None


def convert_record(spec: BenchmarkSpec, rec: Dict[str, Any], where: str, row: int) -> Dict[str, Any]:
    """One public-layout record -> {problem, answer, [solution], id, benchmark}."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    pk, problem = _first(rec, spec.problem_keys)
    if pk is None:
        raise DataError(
            f"{where}: no problem field for {spec.name} (looked for {list(spec.problem_keys)}; present: {sorted(rec)})"
        )
    _, solution = _first(rec, spec.solution_keys)
    ak, answer = _first(rec, spec.answer_keys)
    if ak is not None and spec.split_answer is not None:
        answer, solution = spec.split_answer(str(answer))
        if answer is None:
            raise DataError(f"{where}: {spec.name} field '{ak}' has no '#### N' final answer")
    if ak is None and solution is not None:
        answer = last_boxed(str(solution))
    if answer is None or not str(answer).strip():
        raise DataError(
            f"{where}: no answer for {spec.name} (looked for {list(spec.answer_keys)} and a "
            f"\\boxed{{}} in {list(spec.solution_keys) or 'no solution field'}; present: {sorted(rec)})"
        )
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    out: Dict[str, Any] = {"problem": str(problem), "answer": str(answer).strip()}
    if solution is not None and str(solution).strip():
        out["solution"] = str(solution)
    _, rid = _first(rec, spec.id_keys)
    out["id"] = str(rid) if rid is not None else f"{spec.name}-{row}"
    out["benchmark"] = spec.name
    return out


def prepare_benchmark(name: str, src: str, out: str) -> int:
    """Convert `src` (jsonl | json | parquet | datasets folder, public layout) to our jsonl at `out`.
    Returns the number of problems written. The output is written atomically, only if every row converts."""
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    spec = BENCHMARKS[name]
    rows: List[Dict[str, Any]] = []
    for i, (label, rec) in enumerate(_iter_rows(src)):
        rows.append(convert_record(spec, rec, f"{src} {label}", i + 1))
    if not rows:
        raise DataError(f"{src}: no records")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
