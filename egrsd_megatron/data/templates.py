"""Student and teacher prompts (method.md): the teacher sees the problem plus privileged context.

    student: chat(user = student_template.format(problem=x))
    teacher: chat(user = teacher_template.format(problem=x, solution=c))

Both use the same chat format and thinking mode, so the response that follows is in the same position
of the conversation. The teacher scores exactly the student's sampled response ids after its own
prefix: `teacher_sequence` concatenates ids and never re-tokenizes the response text (decode/encode
does not round-trip in general, e.g. a sampled non-canonical BPE split).
"""

from __future__ import annotations

import string
from typing import Any, Dict, List, Sequence, Tuple

from ..config.schema import ConfigError, PromptConfig
from ..utils.errors import InputError
from .chat_format import Special, qwen3_segments
from .dataset import Problem


def _template_fields(template: str, key: str) -> set:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(
            f"config key '{key}': not a valid format string ({e}); write literal braces as {{{{ }}}}"
        ) from None


class PromptBuilder:
    """Builds prompt token ids for the student and the teacher from a `Problem`."""

    def __init__(self, tokenizer: Any, prompt_cfg: PromptConfig) -> None:
        prompt_cfg.validate()
        for key, template, allowed in (
            ("prompt.student_template", prompt_cfg.student_template, {"problem"}),
            ("prompt.teacher_template", prompt_cfg.teacher_template, {"problem", "solution"}),
        ):
            extra = _template_fields(template, key) - allowed
            if extra:
                raise ConfigError(
                    f"config key '{key}': unknown placeholder(s) {sorted(extra)}; allowed: "
                    f"{sorted(allowed)} (write literal braces as {{{{ }}}})"
                )
        self.tokenizer = tokenizer
        self.cfg = prompt_cfg
        if prompt_cfg.chat_format == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "config key 'prompt.chat_format': 'tokenizer' needs a tokenizer with a chat template; "
                "this one has none (use chat_format=qwen3)"
            )
        self._special_ids: Dict[str, int] = {}

    # ---- text ----
    def _messages(self, user: str) -> List[Dict[str, str]]:
        msgs = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        return msgs + [{"role": "user", "content": user}]

    def student_text(self, problem: Problem) -> str:
        return self.cfg.student_template.format(problem=problem.problem)

    def teacher_text(self, problem: Problem) -> str:
        if not problem.solution:
            raise InputError(
                f"{problem.source} row {problem.index + 1}: the teacher prompt needs a non-empty "
                f"solution (privileged context); this problem has none"
            )
        return self.cfg.teacher_template.format(problem=problem.problem, solution=problem.solution)

    # ---- ids ----
    def _token_id(self, token: str):
        """The id of `token` if the vocabulary really has it (an unknown token maps to unk: round-trip)."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or self.tokenizer.convert_ids_to_tokens(int(tid)) != token:
            return None
        return int(tid)

    def _special_id(self, token: str) -> int:
        if token not in self._special_ids:
            tid = self._token_id(token)
            if tid is None:
                raise ConfigError(
                    f"config key 'prompt.chat_format': the tokenizer has no {token} token, so the "
                    f"qwen3 chat format cannot be used with it (try chat_format=tokenizer)"
                )
            self._special_ids[token] = tid
        return self._special_ids[token]

    def _encode_text(self, text: str) -> List[int]:
        # split_special_tokens: text that looks like a special token stays text (no prompt injection).
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def chat_ids(self, user: str) -> List[int]:
        """Token ids of the chat prompt (with generation prompt) for one user message."""
        if self.cfg.chat_format == "tokenizer":
            text = self.tokenizer.apply_chat_template(
                self._messages(user), tokenize=False, add_generation_prompt=True, enable_thinking=self.cfg.thinking
            )
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        ids: List[int] = []
        for seg in qwen3_segments(self._messages(user), add_generation_prompt=True, thinking=self.cfg.thinking):
            ids += [self._special_id(seg.token)] if isinstance(seg, Special) else self._encode_text(seg)
        return ids

    def student_prompt_ids(self, problem: Problem) -> List[int]:
        return self.chat_ids(self.student_text(problem))

    def teacher_prompt_ids(self, problem: Problem) -> List[int]:
        return self.chat_ids(self.teacher_text(problem))

    def teacher_sequence(self, problem: Problem, response_ids: Sequence[int]) -> Tuple[List[int], int]:
        """(teacher prefix + response ids, response_start): ids[response_start:] == response_ids exactly."""
        prefix = self.teacher_prompt_ids(problem)
        return prefix + [int(t) for t in response_ids], len(prefix)

    @property
    def eos_token_ids(self) -> List[int]:
        """Ids that end a response: <|im_end|> and <|endoftext|> when present, and the tokenizer's eos."""
        out: List[int] = []
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self._token_id(tok)
            if tid is not None and tid not in out:
                out.append(tid)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and int(eos) not in out:
            out.append(int(eos))
        if not out:
            raise ConfigError(
                "config key 'tokenizer.path': the tokenizer has no eos token and no <|im_end|>; "
                "generation could never stop"
            )
        return out
