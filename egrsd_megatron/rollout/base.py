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
- `sleep()`: the generation phase is over; an engine that can (vllm with rollout.vllm_sleep) gives its
  device memory back until the next `update_weights` / `generate`, which wake it. A no-op otherwise.
- `tp_size`: how many ranks generate together (a vLLM tensor-parallel group: each member must be given the
  same prompts and returns the same completions); 1 for an engine that generates alone.
- Each Completion carries `logprobs[i]`, the log-prob of `response_ids[i]` under the distribution the engine
  drew it from: log softmax(filter(z / T)), i.e. after the temperature and after top-k / top-p truncation
  when those are on (renormalised over the kept tokens). Greedy (T = 0): the log-prob of the argmax token
  under softmax(z), T = 1 and no truncation (what vLLM's processed logprobs give for a greedy request).
- Stopping: a row stops after a token in `stop_token_ids`, or when its generated ids END WITH one of
  `stop_sequences` (token-id sequences, e.g. `rollout.stop` strings encoded by `stop_sequences_from_strings`).
  The stop token / sequence is KEPT in response_ids (and in logprobs), so the response mask covers it and the
  policy learns to emit it. Matching is on token ids: a stop string that the model spells with another
  tokenization (a merge across its boundary) does not stop the row.
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
    stop_sequences: List[List[int]] = field(default_factory=list)  # token-id sequences (see module docstring)

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
        self.stop_sequences = [[int(t) for t in seq] for seq in self.stop_sequences]
        for i, seq in enumerate(self.stop_sequences):
            if not seq:
                raise ValueError(f"SamplingParams.stop_sequences[{i}] is empty: a stop sequence needs >= 1 token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def ends_with_stop(self, ids: Sequence[int]) -> bool:
        """True when `ids` (a row's generated ids so far) end with a stop token or a stop sequence."""
        if ids and ids[-1] in self.stop_token_ids:
            return True
        return any(len(ids) >= len(seq) and list(ids[-len(seq) :]) == seq for seq in self.stop_sequences)

    @classmethod
    def from_config(
        cls, rollout_cfg: Any, stop_token_ids: Sequence[int], seed: Optional[int] = None, tokenizer: Any = None
    ) -> "SamplingParams":
        """From a `RolloutConfig` (or `EvalConfig`: same field names). `stop_token_ids` come from the
        tokenizer/prompt builder (e.g. PromptBuilder.eos_token_ids); the strings of `rollout.stop` (when the
        config has that field) become token sequences through `tokenizer` (required then)."""
        strings = list(getattr(rollout_cfg, "stop", None) or [])
        return cls(
            temperature=float(rollout_cfg.temperature),
            top_p=float(rollout_cfg.top_p),
            top_k=int(rollout_cfg.top_k),
            max_new_tokens=int(rollout_cfg.max_new_tokens),
            stop_token_ids=list(stop_token_ids),
            seed=seed,
            stop_sequences=stop_sequences_from_strings(strings, tokenizer) if strings else [],
        )


def stop_sequences_from_strings(strings: Sequence[str], tokenizer: Any) -> List[List[int]]:
    """Each `rollout.stop` string as the token ids the tokenizer gives it alone (no special tokens)."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        raise ValueError(
            "rollout.stop: mapping stop strings to token sequences needs the tokenizer; pass "
            "tokenizer= to SamplingParams.from_config (or empty rollout.stop)"
        )
    out = []
    for i, s in enumerate(strings):
        if not isinstance(s, str) or not s:
            raise ValueError(f"rollout.stop[{i}] = {s!r}: each stop must be a non-empty string")
        ids = list(tokenizer.encode(s, add_special_tokens=False))
        if not ids:
            raise ValueError(f"rollout.stop[{i}] = {s!r} encodes to no tokens with this tokenizer")
        out.append([int(t) for t in ids])
    return out


@dataclass
class Completion:
    prompt_ids: List[int]
    response_ids: List[int]  # no padding; ends with the stop token / sequence when one was generated
    text: str  # decoded response, special tokens skipped
    truncated: bool  # hit max_new_tokens without a stop token / sequence
    # log-prob of each response id under the sampling distribution (module docstring); aligned with
    # response_ids. Engines always fill it; empty only in a Completion built by hand (test fakes).
    logprobs: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logprobs and len(self.logprobs) != len(self.response_ids):
            raise ValueError(f"Completion: {len(self.logprobs)} logprobs for {len(self.response_ids)} response ids")

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

    tp_size: int = 1  # ranks that generate the same rows together (module docstring)

    @abc.abstractmethod
    def generate(
        self, prompts: List[List[int]], params: SamplingParams, seeds: Optional[Sequence[int]] = None
    ) -> List[Completion]:
        """One Completion per prompt (token ids), in order; row i uses seed `seeds[i]` when given."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Copy full Hugging Face-named tensors into the engine's model (every weight must be given)."""

    def sleep(self) -> None:  # noqa: B027 - optional hook: only engines with a sleep mode override it
        """Release device memory until the next update_weights / generate (module docstring)."""

    def close(self) -> None:  # noqa: B027 - optional hook: engines without resources need not override it
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
