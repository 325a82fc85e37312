"""Final-number reward for small models (SmolLM2) that rarely box their answer.

The prediction is, in order of preference, in the final section (after `</think>`): the last non-empty
\\boxed{N}; the last "#### N"; the last "answer is N"; else the last number in the text. It scores 1.0
when that number equals the numeric gold answer (relative tolerance 1e-6).
"""

from __future__ import annotations

import math
from typing import Optional

from .errors import RewardRejected
from .extract import ANSWER_IS_RE, HASHES_RE, NUMBER_RE, final_section, last_boxed, to_number


def predicted_number(response: str) -> Optional[float]:
    final = final_section(response)
    if final is None:
        return None
    box = last_boxed(final)
    if box is not None and to_number(box) is not None:
        return to_number(box)
    for rx in (HASHES_RE, ANSWER_IS_RE):
        hits = rx.findall(final)
        if hits:
            return to_number(hits[-1])
    nums = NUMBER_RE.findall(final)
    return to_number(nums[-1]) if nums else None


def final_number_reward_raw(response: str, answer: str) -> float:
    gold = to_number(answer)
    if gold is None:
        raise RewardRejected(
            f"gold answer {answer[:80]!r} is not a number: final_number needs numeric answers (use reward.name=math)"
        )
    pred = predicted_number(response)
    if pred is None:
        return 0.0
    return 1.0 if math.isclose(pred, gold, rel_tol=1e-6, abs_tol=1e-9) else 0.0


def math_or_final_number_raw(response: str, answer: str) -> float:
    """math-verify on the boxed answer; if that fails and the gold is a number, the final-number rule."""
    from .math_verify_reward import math_reward_raw

    try:
        if math_reward_raw(response, answer) == 1.0:
            return 1.0
    except RewardRejected:
        pass
    if to_number(answer) is None:
        return 0.0
    return final_number_reward_raw(response, answer)
