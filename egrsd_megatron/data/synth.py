"""Synthetic multi-step arithmetic word problems with worked solutions, for CPU demos and tests.

Each problem is a short story (apples in bags, prices and change, ...) whose answer needs exactly
`steps` arithmetic operations on small non-negative integers. The worked solution shows one line per
operation and ends with "So the answer is \\boxed{N}." and a last line "#### N", so both the strict math
reward and the final-number reward can read it. Problem i depends only on (seed, i): the first k
problems of a larger set equal a set of k.
"""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

from ..utils.errors import InputError

_NAMES = [
    ("Tom", "he"),
    ("Ann", "she"),
    ("Lena", "she"),
    ("Omar", "he"),
    ("Mia", "she"),
    ("Ravi", "he"),
    ("Sara", "she"),
    ("Ben", "he"),
    ("Yuki", "she"),
    ("Leo", "he"),
]
_FRIENDS = ["a cousin", "a friend", "a neighbour", "the teacher", "a classmate"]
# (item, container, edible)
_ITEMS = [
    ("apple", "bag", True),
    ("marble", "jar", False),
    ("cookie", "box", True),
    ("pencil", "pack", False),
    ("sticker", "sheet", False),
    ("orange", "basket", True),
    ("egg", "carton", True),
    ("card", "deck", False),
]
_THINGS = [("notebook", (2, 9)), ("pen", (1, 5)), ("sandwich", (3, 8)), ("ticket", (4, 12)), ("book", (6, 15))]


def _pl(s: str) -> str:
    return s + "es" if s.endswith(("ch", "sh", "x", "s")) else s + "s"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _items(rng: random.Random, steps: int) -> Tuple[str, List[str], int]:
    name, pron = rng.choice(_NAMES)
    item, box, edible = rng.choice(_ITEMS)
    story: List[str] = []
    work: List[str] = []
    left = steps
    if rng.random() < 0.5:
        a, b = rng.randint(2, 6), rng.randint(2, 9)
        q = a * b
        story.append(f"{name} has {a} {_pl(box)} with {b} {_pl(item)} in each {box}.")
        work.append(f"{name} starts with {a} * {b} = {q} {_pl(item)}.")
        left -= 1
    else:
        q = rng.randint(5, 30)
        story.append(f"{name} has {q} {_pl(item)}.")
    question = f"How many {_pl(item)} does {name} have now?"
    while left > 0:
        divisors = [k for k in range(2, 7) if q % k == 0 and q // k >= 1]
        ops = ["add", "add", "sub", "sub", "times"] if q <= 60 else ["add", "sub", "sub"]
        if left == 1 and divisors:
            ops.append("share")
        if q < 3:
            ops = [o for o in ops if o != "sub"]
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(2, 20)
            verb = rng.choice(["buys", "finds", "is given"])
            story.append(f"Then {pron} {verb} {b} more {_pl(item)}.")
            work.append(f"After that {pron} has {q} + {b} = {q + b} {_pl(item)}.")
            q += b
        elif op == "sub":
            b = rng.randint(2, q - 1)
            if edible and rng.random() < 0.5:
                story.append(f"{_cap(pron)} eats {b} of them.")
            else:
                story.append(f"{_cap(pron)} gives {b} {_pl(item)} to {rng.choice(_FRIENDS)}.")
            work.append(f"{_cap(pron)} has {q} - {b} = {q - b} {_pl(item)} left.")
            q -= b
        elif op == "times":
            k = rng.choice([2, 3])
            story.append(f"Then the number of {_pl(item)} {pron} has {'doubles' if k == 2 else 'triples'}.")
            work.append(f"The {_pl(item)} become {q} * {k} = {q * k}.")
            q *= k
        else:
            k = rng.choice(divisors)
            story.append(f"{_cap(pron)} shares all the {_pl(item)} equally among {k} friends.")
            question = f"How many {_pl(item)} does each friend get?"
            work.append(f"Each friend gets {q} / {k} = {q // k} {_pl(item)}.")
            q //= k
        left -= 1
    return " ".join(story + [question]), work, q


def _money(rng: random.Random, steps: int) -> Tuple[str, List[str], int]:
    name, pron = rng.choice(_NAMES)
    (thing, (lo, hi)), (thing2, (lo2, hi2)) = rng.sample(_THINGS, 2)
    a, p = rng.randint(2, 6), rng.randint(lo, hi)
    q = a * p
    story = [f"{name} buys {a} {_pl(thing)} that cost ${p} each."]
    work = [f"The {_pl(thing)} cost {a} * {p} = {q} dollars."]
    question = f"How many dollars does {name} spend?"
    bought_extra = False
    for s in range(steps - 1):
        last = s == steps - 2
        if last and rng.random() < 0.5:
            bill = next(b for b in (10, 20, 50, 100, 200, 500) if b > q)
            story.append(f"{_cap(pron)} pays with a ${bill} bill.")
            question = f"How many dollars of change does {name} get?"
            work.append(f"The change is {bill} - {q} = {bill - q} dollars.")
            q = bill - q
        else:
            c = rng.randint(lo2, hi2)
            story.append(f"{_cap(pron)} also buys {'another' if bought_extra else 'a'} {thing2} for ${c}.")
            bought_extra = True
            question = f"How many dollars does {name} spend in total?"
            work.append(f"In total {pron} spends {q} + {c} = {q + c} dollars.")
            q += c
    return " ".join(story + [question]), work, q


def generate_problems(n: int, seed: int, min_steps: int = 1, max_steps: int = 2) -> List[Dict[str, str]]:
    """n problems {problem, solution, answer}; steps uniform in [min_steps, max_steps]; deterministic by seed."""
    if n < 0:
        raise InputError(f"--n must be >= 0, got {n}")
    if not 1 <= min_steps <= max_steps:
        raise InputError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    out: List[Dict[str, str]] = []
    for i in range(n):
        rng = random.Random(f"egrsd-synth/{seed}/{i}")  # str seeds hash with sha512: stable across runs
        steps = rng.randint(min_steps, max_steps)
        problem, work, q = (_money if rng.random() < 0.35 else _items)(rng, steps)
        solution = "\n".join(work + [f"So the answer is \\boxed{{{q}}}.", f"#### {q}"])
        out.append({"problem": problem, "solution": solution, "answer": str(q)})
    return out
