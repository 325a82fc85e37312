"""Held-out phrasings of one-step arithmetic word problems: other wordings than the training generator's.

`data/synth.py` writes the training stories ("Tom has 3 bags with 4 apples in each bag. ..."). A model
tuned on those can gain by learning their wording rather than the arithmetic; these generators ask the
same kind of question (one operation on small integers) in other words, so a held-out benchmark in each
phrasing measures transfer:

  arith           a bare expression: "What is 17 + 6?"
  question_first  the question leads, the facts follow: "How many pens does Ann have if she had 9 and ..."
  scene           other scenes and verbs (shelves, buses, savings, rows of chairs, recipes), third person
                  objects instead of a named owner

Each problem has the fields of synth.py (problem, solution with one "a op b = c" line, "So the answer is
\\boxed{N}." and "#### N", answer) plus `phrasing`. Problem i depends only on (phrasing, seed, i).
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

from .synth import _NAMES, _pl

Op = Tuple[str, int, int, int]  # (symbol, a, b, result)


def _op(rng: random.Random) -> Op:
    kind = rng.choice(["+", "-", "*", "/"])
    if kind == "+":
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        return "+", a, b, a + b
    if kind == "-":
        a = rng.randint(8, 60)
        b = rng.randint(2, a - 1)
        return "-", a, b, a - b
    if kind == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return "*", a, b, a * b
    b, q = rng.randint(2, 6), rng.randint(2, 12)
    return "/", b * q, b, q


def _arith(rng: random.Random) -> Tuple[str, Op]:
    op = _op(rng)
    sym, a, b, _ = op
    shown = {"+": "+", "-": "-", "*": "\u00d7", "/": "\u00f7"}[sym]
    form = rng.choice(
        ["What is {a} {s} {b}?", "Compute {a} {s} {b}.", "Calculate {a} {s} {b}.", "Find the value of {a} {s} {b}."]
    )
    return form.format(a=a, s=shown, b=b), op


_QF_ITEMS = ["pen", "stamp", "shell", "coin", "balloon", "crayon", "button", "ribbon"]


def _question_first(rng: random.Random) -> Tuple[str, Op]:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_QF_ITEMS)
    op = _op(rng)
    sym, a, b, _ = op
    it = _pl(item)
    if sym == "+":
        text = f"How many {it} does {name} have if {pron} had {a} {it} and then got {b} more?"
    elif sym == "-":
        text = f"How many {it} are left for {name} if {pron} had {a} {it} and lost {b} of them?"
    elif sym == "*":
        text = f"How many {it} does {name} own in total if {pron} owns {a} boxes holding {b} {it} each?"
    else:
        text = f"How many {it} does each child get if {name} splits {a} {it} evenly among {b} children?"
    return text, op


def _scene(rng: random.Random) -> Tuple[str, Op]:
    op = _op(rng)
    sym, a, b, _ = op
    if sym == "+":
        text = rng.choice(
            [
                f"A shelf holds {a} books. The librarian puts {b} more books on it. "
                "How many books are on the shelf now?",
                f"A jar has {a} dollars of savings. This week {b} dollars are added. How many dollars are in the jar?",
                f"A bus has {a} passengers. At the next stop {b} people get on. How many passengers are on the bus?",
            ]
        )
    elif sym == "-":
        text = rng.choice(
            [
                f"A shelf holds {a} books. {b} of them are borrowed. How many books remain on the shelf?",
                f"A bus has {a} passengers. At the next stop {b} people get off. "
                "How many passengers are still on the bus?",
                f"A baker made {a} rolls and sold {b}. How many rolls were not sold?",
            ]
        )
    elif sym == "*":
        text = rng.choice(
            [
                f"A hall has {a} rows of chairs with {b} chairs in every row. How many chairs are in the hall?",
                f"One recipe needs {b} eggs. How many eggs are needed for {a} recipes?",
                f"A garden has {a} beds and each bed has {b} plants. How many plants are there?",
            ]
        )
    else:
        text = rng.choice(
            [
                f"{a} chairs are set out in {b} equal rows. How many chairs are in each row?",
                f"A ribbon {a} metres long is cut into {b} equal pieces. How long is each piece, in metres?",
                f"{a} stickers are packed into {b} envelopes with the same number in each. "
                f"How many stickers go in one envelope?",
            ]
        )
    return text, op


PHRASINGS: Dict[str, Callable[[random.Random], Tuple[str, Op]]] = {
    "arith": _arith,
    "question_first": _question_first,
    "scene": _scene,
}


def generate_phrased(n: int, seed: int, phrasing: str) -> List[Dict[str, str]]:
    """n one-step problems in `phrasing` (a key of PHRASINGS); deterministic by (phrasing, seed, i)."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"unknown phrasing {phrasing!r}: expected one of {', '.join(PHRASINGS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: List[Dict[str, str]] = []
    for i in range(n):
        rng = random.Random(f"egrsd-phrasing/{phrasing}/{seed}/{i}")
        text, (sym, a, b, q) = PHRASINGS[phrasing](rng)
        solution = "\n".join([f"{a} {sym} {b} = {q}.", f"So the answer is \\boxed{{{q}}}.", f"#### {q}"])
        out.append({"problem": text, "solution": solution, "answer": str(q), "phrasing": phrasing})
    return out
