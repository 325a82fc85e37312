"""Finding the final answer in a response: the part after thinking, the last \\boxed{...}, numbers.

Hand-written because a brace-balanced scan is needed (regexes cannot match nested braces) and
math-verify's own extraction would also accept answers written inside the thinking block.
"""

from __future__ import annotations

import re
from typing import List, Optional

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)")


def final_section(response: str) -> Optional[str]:
    """The text after the last `</think>`; the whole response when it has no thinking block.

    None when a `<think>` was opened and never closed (a truncated thought has no final answer): an answer
    that appears only inside the thinking does not count.
    """
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in response:
        return None
    return response


def _braced(text: str, start: int) -> Optional[tuple]:
    """text[start] == '{': (content, end index after the closing brace) or None if unbalanced.
    Escaped braces (\\{ \\}) are LaTeX set braces, not grouping, so they do not count."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def all_boxed(text: str) -> List[str]:
    """Contents of every complete \\boxed{...} / \\fbox{...} (and `\\boxed 5`), in order; empty ones dropped."""
    out: List[str] = []
    for m in _BOX_RE.finditer(text):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            got = _braced(text, j)
            if got is None:
                continue
            content = got[0]
        elif j > m.end():  # "\boxed 5": one token up to whitespace or '$'
            content = re.match(r"[^\s$]*", text[j:]).group(0)  # type: ignore[union-attr]
        else:
            continue
        if content.strip():
            out.append(content.strip())
    return out


def last_boxed(text: str) -> Optional[str]:
    boxes = all_boxed(text)
    return boxes[-1] if boxes else None


_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
NUMBER_RE = re.compile(_NUM)
HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUM + ")")
ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\$?\s*(?:\\\(|\\\[)?\s*(" + _NUM + ")", re.IGNORECASE)


def to_number(text: str) -> Optional[float]:
    """'1,234' -> 1234.0, '3/4' -> 0.75, '$5' -> 5.0, '12.' -> 12.0; None when it is not one number."""
    s = text.strip().replace(",", "").replace("$", "").replace("\\!", "").strip().rstrip(".")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip()
    m = re.fullmatch(r"([-+]?\d*\.?\d+)(?:/(\d+))?", s)
    if m is None:
        m2 = re.fullmatch(r"\\d?frac\{([-+]?\d+)\}\{(\d+)\}", s)
        if m2 is None or int(m2.group(2)) == 0:
            return None
        return int(m2.group(1)) / int(m2.group(2))
    if m.group(2) is not None:
        den = int(m.group(2))
        return None if den == 0 else float(m.group(1)) / den
    return float(m.group(1))
