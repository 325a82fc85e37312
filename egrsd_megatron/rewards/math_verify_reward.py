"""Verifiable math reward: the last \\boxed{...} after the thinking, checked with math-verify.

This is the raw (unbounded) function: it runs inside the reward worker processes, where math-verify's
signal-based timeouts are disabled (they only work in a main thread) and time is bounded by killing
the worker (see bounded.py). Call `egrsd_megatron.rewards.math_reward` instead, which is bounded.
"""

from __future__ import annotations

import logging
import re

from .errors import RewardRejected
from .extract import final_section, last_boxed

# No real final answer is this long; parsing such strings only burns the time budget.
MAX_ANSWER_CHARS = 1000


def _quiet_math_verify() -> None:
    # math-verify warns on every call that its own timeout is off; here the pool bounds time instead.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).strip("$.")


def math_reward_raw(response: str, answer: str) -> float:
    """1.0 when the final boxed answer is mathematically equivalent to `answer`, else 0.0."""
    final = final_section(response)
    if final is None:
        return 0.0
    pred_text = last_boxed(final)
    if pred_text is None:
        return 0.0
    if len(pred_text) > MAX_ANSWER_CHARS or len(answer) > MAX_ANSWER_CHARS:
        raise RewardRejected(
            f"final answer of {len(pred_text)} chars / gold of {len(answer)} chars is over {MAX_ANSWER_CHARS}"
        )
    _quiet_math_verify()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_src = answer if "\\boxed" in answer else f"${answer}$"
    gold = parse(gold_src, extraction_config=cfg, parsing_timeout=None)
    pred = parse(f"${pred_text}$", extraction_config=cfg, parsing_timeout=None)
    if gold and pred and verify(gold, pred, timeout_seconds=None):
        return 1.0
    # Answers math-verify cannot parse (names, words): exact match after whitespace normalisation.
    return 1.0 if _norm(pred_text) == _norm(answer) else 0.0
