"""A byte-level tokenizer (256 byte tokens + the Qwen3 chat/thinking special tokens) for tiny models.

Why: tests and the QUICK demo train random tiny Qwen3 models whose vocabulary must stay small (a
151,936-token output layer would dominate their cost); real runs use the real Qwen3 tokenizer.
Built with the `tokenizers` library (byte-level BPE with no merges), wrapped as a HF fast tokenizer.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# As in Qwen3: the thinking tags are single tokens but NOT special, so decoding keeps them and the
# rewards can find `</think>`.
THINK_TOKENS = ["<think>", "</think>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return fast
