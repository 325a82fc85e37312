"""Reward outcomes that score 0 and are counted separately from wrong answers."""


class RewardRejected(ValueError):
    """The input cannot be scored sensibly (e.g. a 100k-character final answer): score 0, counted as rejected."""
