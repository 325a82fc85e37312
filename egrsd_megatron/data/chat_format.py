"""The Qwen3 chat format, written by the project (no Qwen3 tokenizer_config.json can be downloaded here).

Semantics of Qwen3's published template for the messages we use (system?, user, generation prompt):

    <|im_start|>system\n{system}<|im_end|>\n          (only when a system message is given; Qwen3 adds none)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n                             (generation prompt)
    <think>\n\n</think>\n\n                             (only with enable_thinking=False: an empty thought)

With thinking on, the model itself writes `<think>\n...\n</think>\n\n` and then the answer.
The renderer returns segments (text pieces and special-token markers) so the prompt builder can encode
user text with special-token splitting OFF: a problem that happens to contain "<|im_end|>" stays text.
`QWEN3_JINJA_TEMPLATE` is the same format as a Jinja chat template, saved into the built Qwen3 tokenizer
folder; a test checks that both renderings agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Special:
    """A special token, emitted by id rather than by tokenizing its text."""

    token: str


Segment = Union[str, Special]


def qwen3_segments(
    messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True, thinking: bool = True
) -> List[Segment]:
    segs: List[Segment] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"chat message {i}: expected role system|user|assistant and string content, got {m!r}")
        segs += [Special(IM_START), f"{role}\n", content, Special(IM_END), "\n"]
    if add_generation_prompt:
        segs += [Special(IM_START), "assistant\n"]
        if not thinking:
            segs += [Special(THINK_OPEN), "\n\n", Special(THINK_CLOSE), "\n\n"]
    return segs


# Same semantics as above (and as Qwen3's template for these messages); `enable_thinking` defaults to on.
QWEN3_JINJA_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
