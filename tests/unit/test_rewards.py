"""Reward tables (equivalent forms, wrong answers, missing box, thinking-only answers) on the raw functions,
and the same table once through the bounded pool."""

import pytest

from egrsd_megatron.rewards import (
    RewardRejected,
    final_number_reward,
    get_reward,
    math_reward,
    raw_reward,
    reward_names,
    score_batch,
)
from egrsd_megatron.rewards.extract import all_boxed, final_section, last_boxed

MATH_CASES = [
    # (response, answer, expected)
    ("So \\boxed{0.5}", "1/2", 1.0),
    ("So \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("So \\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),  # nested braces
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{10.0}", "10", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", 1.0),  # escaped set braces inside a box
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("The answer: \\boxed 7", "7", 1.0),
    ("first \\boxed{4}, corrected: \\boxed{5}", "5", 1.0),  # the last box counts
    ("first \\boxed{4}, corrected: \\boxed{5}", "4", 0.0),
    ("\\boxed{5} and then \\boxed{6", "5", 1.0),  # unterminated last box is ignored
    ("\\boxed{} then \\boxed{12}", "12", 1.0),
    ("\\boxed{3}", "4", 0.0),  # wrong
    ("\\boxed{0.33}", "1/3", 0.0),
    ("\\boxed{-5}", "5", 0.0),
    ("The answer is 5.", "5", 0.0),  # missing box
    ("\\boxed{}", "5", 0.0),  # empty box
    ("<think>It is \\boxed{5}.</think>\n\nI am not sure.", "5", 0.0),  # answer inside thinking only
    ("<think>maybe \\boxed{4}</think>\n\nFinal: \\boxed{5}", "5", 1.0),
    ("<think>maybe \\boxed{4}</think>\n\nFinal: \\boxed{5}", "4", 0.0),
    ("<think>still thinking ... \\boxed{5}", "5", 0.0),  # truncated thought: no final answer
    ("\\boxed{Paris}", "Paris", 1.0),  # unparsable: exact text match
]

NUMBER_CASES = [
    ("so #### 5", "5", 1.0),
    ("The answer is: 7.", "7", 1.0),
    ("I think the answer is $1,234.", "1234", 1.0),
    ("\\boxed{} so 12 apples", "12", 1.0),  # SmolLM2's empty box: last number
    ("\\boxed{5} #### 6", "5", 1.0),  # a box wins over ####
    ("#### 6 and later 9", "6", 1.0),  # #### wins over the last number
    ("3 bags, so 3/4 of it", "0.75", 1.0),
    ("we get \\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("it is 11", "12", 0.0),
    ("no number here", "3", 0.0),
    ("<think>12</think> hmm", "12", 0.0),
    ("<think>12</think> so 12", "12", 1.0),
    ("<think>12", "12", 0.0),
]


@pytest.mark.parametrize("response,answer,expected", MATH_CASES)
def test_math_table_raw(response, answer, expected):
    assert raw_reward("math")(response, answer) == expected


@pytest.mark.parametrize("response,answer,expected", NUMBER_CASES)
def test_final_number_table_raw(response, answer, expected):
    assert raw_reward("final_number")(response, answer) == expected


def test_tables_through_the_bounded_pool():
    """The pool path gives the same scores as the raw functions (one batch per reward, all cores)."""
    # generous timeout: these are correctness checks, and the test machine may be heavily loaded
    scores, stats = score_batch([r for r, _, _ in MATH_CASES], [a for _, a, _ in MATH_CASES], name="math", timeout_s=60)
    assert scores == [e for _, _, e in MATH_CASES]
    assert stats["n"] == len(MATH_CASES) and stats["timeouts"] == stats["errors"] == stats["rejected"] == 0
    assert stats["num_correct"] == sum(e for _, _, e in MATH_CASES)
    scores, _ = score_batch(
        [r for r, _, _ in NUMBER_CASES],
        [a for _, a, _ in NUMBER_CASES],
        name="final_number",
        num_workers=1,
        timeout_s=60,
    )
    assert scores == [e for _, _, e in NUMBER_CASES]
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5", timeout_s=60) == 1.0
    assert math_reward("\\boxed{2}", "0.5", timeout_s=60) == 0.0
    assert final_number_reward("#### 5", "5", timeout_s=60) == 1.0


def test_math_or_final_number():
    f = raw_reward("math_or_final_number")
    assert f("so #### 5", "5") == 1.0 and f("\\boxed{\\frac12}", "0.5") == 1.0
    assert f("\\boxed{x+1}", "x+1") == 1.0 and f("so 4", "x+1") == 0.0 and f("so 4", "5") == 0.0


def test_extraction_helpers():
    assert last_boxed("a \\boxed{\\frac{a}{b^{2}}} b") == "\\frac{a}{b^{2}}"
    assert all_boxed("\\fbox{1} \\boxed{} \\boxed{ 2 }") == ["1", "2"]
    assert last_boxed("no box") is None
    assert final_section("a</think>b</think>c") == "c" and final_section("<think>x") is None
    assert final_section("plain") == "plain"


def test_registry_and_input_errors():
    assert {"math", "final_number", "math_or_final_number"} <= set(reward_names())
    with pytest.raises(ValueError, match="reward.name.*nope"):
        get_reward("nope")
    assert score_batch([], []) == (
        [],
        {"n": 0, "timeouts": 0, "errors": 0, "rejected": 0, "mean": 0.0, "num_correct": 0, "seconds": 0.0},
    )
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        score_batch(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="item 0"):
        score_batch([None], ["1"])
    with pytest.raises(RewardRejected):
        raw_reward("final_number")("5", "x+1")  # a non-numeric gold cannot be scored by final_number
