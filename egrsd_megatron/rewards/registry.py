"""Rewards by name. Each entry is a raw `(response, answer) -> float` module-level function (it runs in a
worker process, so it must be importable by name); `get_reward` returns the bounded version."""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Sequence, Tuple

from ..config.schema import ConfigError
from .bounded import RawReward, run_bounded
from .final_number import final_number_reward_raw, math_or_final_number_raw
from .math_verify_reward import math_reward_raw

DEFAULT_TIMEOUT_S = 5.0

_RAW: Dict[str, RawReward] = {
    "math": math_reward_raw,
    "final_number": final_number_reward_raw,
    "math_or_final_number": math_or_final_number_raw,
}


def register_reward(name: str, fn: RawReward) -> None:
    """Add a reward. `fn` must be a module-level function (workers import it by name)."""
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>") or fn.__name__ == "<lambda>":
        raise ValueError(
            f"register_reward({name!r}): needs a module-level function (it is pickled by name into "
            f"worker processes), got {fn!r}"
        )
    _RAW[name] = fn


def reward_names() -> List[str]:
    return sorted(_RAW)


def raw_reward(name: str) -> RawReward:
    if name not in _RAW:
        raise ConfigError(f"config key 'reward.name': unknown reward {name!r}; registered: {', '.join(reward_names())}")
    return _RAW[name]


def _bounded_one(name: str, response: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    scores, _ = run_bounded(raw_reward(name), [response], [answer], timeout_s, num_workers=0)
    return scores[0]


def get_reward(name: str) -> Callable[..., float]:
    """The bounded `(response, answer, timeout_s=5.0) -> float` for a registered name."""
    raw_reward(name)
    return functools.partial(_bounded_one, name)


def score_batch(
    responses: Sequence[str], answers: Sequence[str], name: str = "math", timeout_s: float = 5.0, num_workers: int = 0
) -> Tuple[List[float], Dict[str, float]]:
    """Score all pairs on `num_workers` processes (0: all cores), each bounded by timeout_s.

    Returns (scores, stats) with stats n, mean, num_correct, timeouts, errors, rejected, seconds.
    A timed-out, crashed or rejected item scores 0 and is counted.
    """
    return run_bounded(raw_reward(name), responses, answers, timeout_s, num_workers)
