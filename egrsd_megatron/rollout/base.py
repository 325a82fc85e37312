"""The rollout interface: sampling parameters, one completion per prompt, and the engine contract.

Engines (hf_engine.HFEngine and vllm_engine.VLLMEngine, each on CPU or GPU) all honour the same contract so
the trainer and the evaluator never care which one runs:
- `generate(prompts, params, seeds=None)` returns one Completion per prompt entry, in order. Callers
  repeat a prompt G times for a group.
- Determinism: each row is sampled from its OWN random stream, seeded by `seeds[i]` when given, else by
  `row_seed(params.seed, i)`. So a row's result depends only on (weights, prompt, params, its seed), not
  on which other rows share its batch or on sub-batching; that is what lets an interrupted evaluation
  resume and reproduce the uninterrupted file.
- `update_weights(named_tensors)` refits the engine in place from full Hugging Face-named tensors.
"""
from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy (argmax); top_k 0 and top_p 1 mean no filtering."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: List[int] = field(default_factory=list)
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, rollout_cfg: Any, stop_token_ids: Sequence[int], seed: Optional[int] = None
                    ) -> "SamplingParams":
        """From a `RolloutConfig` (or `EvalConfig`: same field names). `stop_token_ids` come from the
        tokenizer/prompt builder (e.g. PromptBuilder.eos_token_ids); string stops in `rollout.stop`
        must be mapped to ids by the caller (a multi-token string cannot be one stop id)."""
        return cls(temperature=float(rollout_cfg.temperature), top_p=float(rollout_cfg.top_p),
                   top_k=int(rollout_cfg.top_k), max_new_tokens=int(rollout_cfg.max_new_tokens),
                   stop_token_ids=list(stop_token_ids), seed=seed)


@dataclass
class Completion:
    prompt_ids: List[int]
    response_ids: List[int]     # no padding; ends with the stop token when one was generated
    text: str                   # decoded response, special tokens skipped
    truncated: bool             # hit max_new_tokens without a stop token

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def row_seed(base: Optional[int], index: int) -> int:
    """A 63-bit seed for row `index` of a call seeded with `base` (None -> fresh entropy per call)."""
    if base is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return stable_seed(base, index)


def stable_seed(*parts: Any) -> int:
    """A seed from any tuple of str/int parts, stable across processes and Python runs (unlike hash())."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class RolloutEngine(abc.ABC):
    """A text generator that can be refitted with new weights."""

    @abc.abstractmethod
    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> List[Completion]:
        """One Completion per prompt (token ids), in order; row i uses seed `seeds[i]` when given."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy full Hugging Face-named tensors into the engine's model (every weight must be given)."""

    def close(self) -> None:
        """Release the model and any worker processes."""

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_prompts(prompts: Sequence[Sequence[int]], seeds: Optional[Sequence[int]]) -> None:
    """Reject empty prompts and a seed list of the wrong length with a message naming the row."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
