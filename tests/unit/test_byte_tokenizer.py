"""The byte-level tokenizer of the tiny test models: lossless on any text, chat specials as single ids."""

from egrsd_megatron.data import load_tokenizer
from egrsd_megatron.data.byte_tokenizer import byte_tokenizer


def test_round_trip_and_ids():
    tok = byte_tokenizer()
    text = "Héllo wörld 12+3=15 \u4f60\u597d\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one id per byte, no merges
    assert tok.decode(ids) == text
    assert len(tok) == 261 and max(ids) < 256


def test_specials_single_ids_and_think_tags_survive_decoding():
    tok = load_tokenizer("byte")
    ids = tok("<|im_start|>user<|im_end|><think>a</think>", add_special_tokens=False)["input_ids"]
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == im_start and ids[5] == im_end and tok.eos_token_id == im_end
    # <think> tags are single tokens but not special (as in Qwen3): rewards look for </think>.
    assert tok.decode(ids, skip_special_tokens=True) == "user<think>a</think>"
