"""The hf engine on a real pretrained model (SmolLM2-135M-Instruct, Llama architecture): greedy decoding with
left padding and early-finishing rows equals transformers' own `generate`."""

from __future__ import annotations

import pytest
import torch

from egrsd_megatron.rollout import SamplingParams
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model

smollm2 = pytest.importorskip("egrsd_megatron.models.smollm2")

MESSAGES = ["What is 7 + 5?", "Name a color.", "What is the capital of France? Answer briefly."]
N_NEW = 32


@pytest.mark.slow
def test_greedy_equals_transformers_generate():
    from transformers import AutoTokenizer

    hf_dir = smollm2.smollm2_hf_dir()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = build_hf_model({}, weights_dir=hf_dir)
    prompts = []
    for m in MESSAGES:
        ids = tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    eos = tok.eos_token_id
    out = HFEngine(model, tok, max_batch=8, pad_token_id=tok.pad_token_id or 0).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=N_NEW, stop_token_ids=[eos])
    )

    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(
            **enc, do_sample=False, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=tok.pad_token_id
        )
    width = enc["input_ids"].shape[1]
    for i, c in enumerate(out):
        r = ref[i, width:].tolist()
        r = r[: r.index(eos) + 1] if eos in r else r
        assert c.response_ids == r, i
        assert c.truncated == (eos not in r)
        assert c.text == tok.decode(r, skip_special_tokens=True)
    assert "12" in out[0].text
