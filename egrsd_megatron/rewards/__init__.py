"""Verifiable rewards, bounded in time from any thread or process (see bounded.py)."""

from __future__ import annotations

from .bounded import reward_counters, shutdown_pools
from .errors import RewardRejected
from .registry import get_reward, raw_reward, register_reward, reward_names, score_batch


def math_reward(response: str, answer: str, timeout_s: float = 5.0) -> float:
    """1.0 when the last \\boxed{...} after `</think>` is equivalent to `answer` (math-verify), else 0.0.
    Bounded by timeout_s from any thread or process; a timeout scores 0 and is counted (reward_counters)."""
    return get_reward("math")(response, answer, timeout_s=timeout_s)


def final_number_reward(response: str, answer: str, timeout_s: float = 5.0) -> float:
    """1.0 when the final number (boxed, "#### N", "answer is N", else last number) equals `answer`."""
    return get_reward("final_number")(response, answer, timeout_s=timeout_s)


__all__ = [
    "math_reward",
    "final_number_reward",
    "get_reward",
    "raw_reward",
    "register_reward",
    "reward_names",
    "score_batch",
    "reward_counters",
    "shutdown_pools",
    "RewardRejected",
]
