"""Deterministic prompt order with a resumable position.

Epoch e visits the problems in the order `permutation_e`, where permutation_e comes from a numpy
generator seeded with (seed, e): any epoch's order can be rebuilt from (seed, epoch) alone, so the
state is just (epoch, position). A batch that crosses the end of an epoch continues in the next one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from ..utils.errors import InputError
from .dataset import Problem


class PromptSampler:
    def __init__(self, problems: Sequence[Problem], seed: int, shuffle: bool = True) -> None:
        if len(problems) == 0:
            raise ValueError("PromptSampler: the problem set is empty")
        self.problems = problems
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.pos = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.problems)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self, n: int) -> List[Problem]:
        if n < 1:
            raise ValueError(f"PromptSampler.next_batch: n must be >= 1, got {n}")
        out: List[Problem] = []
        while len(out) < n:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self._order) - self.pos)
            out += [self.problems[int(i)] for i in self._order[self.pos : self.pos + take]]
            self.pos += take
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "pos": self.pos,
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "epoch", "pos", "num_problems"):
            if key not in state:
                raise ValueError(f"PromptSampler.load_state_dict: state has no '{key}' (got keys {sorted(state)})")
        if int(state["num_problems"]) != len(self.problems):
            raise InputError(
                f"PromptSampler.load_state_dict: the checkpoint saw {state['num_problems']} problems, "
                f"this dataset has {len(self.problems)}; resume with the same data.train_path and "
                f"data.max_prompt_tokens, or start a new run"
            )
        if not 0 <= int(state["pos"]) <= int(state["num_problems"]):
            raise ValueError(f"PromptSampler.load_state_dict: position {state['pos']} out of range")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._order = self._epoch_order(self.epoch)
