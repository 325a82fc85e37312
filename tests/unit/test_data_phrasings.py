"""Held-out phrasings: every worked step re-done independently, determinism, and wording unlike training's."""

import operator
import re

import pytest

from egrsd_megatron.data.phrasings import PHRASINGS, generate_phrased
from egrsd_megatron.data.synth import generate_problems

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_EQ = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$")


@pytest.mark.parametrize("phrasing", sorted(PHRASINGS))
def test_answers_follow_from_the_numbers_in_the_text(phrasing):
    for p in generate_phrased(150, seed=5, phrasing=phrasing):
        m = _EQ.match(p["solution"].split("\n")[0])
        assert m, p
        a, op, b, c = m.groups()
        assert _OPS[op](int(a), int(b)) == int(c) == int(p["answer"]), p
        if op == "/":
            assert int(a) % int(b) == 0, p
        nums = re.findall(r"\d+", p["problem"])
        assert a in nums and b in nums, p  # both operands are stated in the problem
        assert p["solution"].endswith(f"#### {c}") and p["phrasing"] == phrasing


def test_deterministic_and_prefix_stable():
    assert generate_phrased(20, 1, "scene") == generate_phrased(40, 1, "scene")[:20]
    assert generate_phrased(20, 1, "scene") != generate_phrased(20, 2, "scene")


def test_wording_differs_from_the_training_generator():
    train = [p["problem"] for p in generate_problems(300, 1, 1, 1)]
    assert sum(" in each " in t for t in train) > 50  # the training stories do use it
    for name in PHRASINGS:
        texts = [p["problem"] for p in generate_phrased(100, 1, name)]
        assert not any(" with " in t and " in each " in t for t in texts), name  # synth's container phrasing
        assert len(set(texts)) > 90, name


def test_unknown_phrasing_names_the_choices():
    with pytest.raises(ValueError, match="arith"):
        generate_phrased(1, 0, "poetry")
