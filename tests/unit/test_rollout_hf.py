"""The hf rollout engine against plain no-cache forward passes on a tiny random Qwen3."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from egrsd_megatron.rollout import SamplingParams, make_engine
from egrsd_megatron.rollout.hf_engine import HFEngine, build_hf_model
from egrsd_megatron.rollout.sampling import filter_logits, inverse_cdf, select_next

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(
    model_type="qwen3",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.3,
)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [30]]


def _model(seed: int, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_hf_model({**TINY, **over})


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(_model(0), tokenizer=None, max_batch=8, pad_token_id=0)


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt, n: int, stop=()) -> list:
    """Argmax decoding with a full forward over the whole sequence at every step (no cache, no padding)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].double()
        tok = int(torch.argmax(logits))
        out.append(tok)
        seq.append(tok)
        if tok in stop:
            break
    return out


def test_greedy_equals_no_cache_reference_with_left_padding(engine):
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    batched = engine.generate(PROMPTS, params)
    for p, c in zip(PROMPTS, batched):
        ref = greedy_reference(engine.model, p, 12)
        assert c.response_ids == ref
        assert c.prompt_ids == p and c.truncated
    # one-by-one (no padding at all) gives the same rows
    for p, c in zip(PROMPTS, batched):
        assert engine.generate([p], params)[0].response_ids == c.response_ids


def test_stop_token_ends_row_and_is_kept(engine):
    ref = greedy_reference(engine.model, PROMPTS[0], 12)
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop_tok])
    out = engine.generate(PROMPTS, params)
    assert out[0].response_ids == ref[: first + 1] and not out[0].truncated
    for p, c in zip(PROMPTS[1:], out[1:]):
        # other rows: stop where the reference first emits the stop token, else run to the limit
        r = greedy_reference(engine.model, p, 12, stop=(stop_tok,))
        assert c.response_ids == r
        assert c.truncated == (stop_tok not in r)
        assert len(c.response_ids) == 12 or not c.truncated


def test_sampling_is_per_row_deterministic_across_batching():
    model = _model(1)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=10)
    seeds = [11, 12, 13, 14]
    big = HFEngine(model, max_batch=8).generate(PROMPTS, params, seeds=seeds)
    small = HFEngine(model, max_batch=1).generate(PROMPTS, params, seeds=seeds)
    assert [c.response_ids for c in big] == [c.response_ids for c in small]
    # reversed order, same seeds per row -> same rows
    rev = HFEngine(model, max_batch=3).generate(PROMPTS[::-1], params, seeds=seeds[::-1])
    assert [c.response_ids for c in rev[::-1]] == [c.response_ids for c in big]
    other = HFEngine(model, max_batch=8).generate(PROMPTS, params, seeds=[21, 22, 23, 24])
    assert [c.response_ids for c in other] != [c.response_ids for c in big]
    # params.seed alone also reproduces
    p2 = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)
    e = HFEngine(model)
    assert [c.response_ids for c in e.generate(PROMPTS, p2)] == [c.response_ids for c in e.generate(PROMPTS, p2)]


def test_top_k_one_is_greedy(engine):
    g = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8))
    k1 = engine.generate(PROMPTS, SamplingParams(temperature=0.7, top_k=1, max_new_tokens=8, seed=3))
    assert [c.response_ids for c in g] == [c.response_ids for c in k1]


def test_filter_logits_hand_example():
    # probs at T=1: softmax([4, 3, 2, 1, 0]) = [.6364, .2341, .0861, .0317, .0117]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw)))[0].tolist()
    assert kept(top_k=2) == [False, False, False, True, True]
    assert kept(top_p=0.6) == [False, False, False, False, True]  # top token alone covers 0.636
    assert kept(top_p=0.87) == [False, False, False, True, True]  # mass before 3rd = 0.8705 >= 0.87
    assert kept(top_p=0.95) == [False, False, True, True, True]
    assert kept(top_p=0.96) == [False, True, True, True, True]
    x = filter_logits(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(x, logits / 2)


def test_update_weights_equals_from_pretrained(tmp_path, engine):
    target = _model(5)
    target.save_pretrained(str(tmp_path))
    loaded = HFEngine(build_hf_model(TINY, weights_dir=str(tmp_path)))
    e = HFEngine(_model(0))
    storage = {n: p.data_ptr() for n, p in e.model.named_parameters()}
    e.update_weights(target.state_dict().items())
    assert storage == {n: p.data_ptr() for n, p in e.model.named_parameters()}  # refitted in place
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(e.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)
    params = SamplingParams(temperature=0.8, max_new_tokens=10)
    a = e.generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    b = loaded.generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    before = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    assert [c.response_ids for c in a] != [c.response_ids for c in before]


def test_update_weights_errors_and_tied_embeddings():
    e = HFEngine(_model(0))
    sd = dict(e.model.state_dict())
    with pytest.raises(ValueError, match="not a parameter"):
        e.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        e.update_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="not given"):
        e.update_weights([(k, v) for k, v in sd.items() if k != "model.norm.weight"])
    tied = HFEngine(_model(0, tie_word_embeddings=True))
    src = _model(2, tie_word_embeddings=True).state_dict()
    tied.update_weights((k, v) for k, v in src.items() if k != "lm_head.weight")
    assert torch.equal(tied.model.lm_head.weight, src["model.embed_tokens.weight"])


def test_make_engine_and_params_from_config():
    cfg = SimpleNamespace(engine="hf", temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=7, max_batch=2)
    sp = SamplingParams.from_config(cfg, [3, 4], seed=1)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sp.stop_token_ids, sp.seed) == (
        0.6,
        0.95,
        20,
        7,
        [3, 4],
        1,
    )
    e = make_engine(cfg, TINY, tokenizer=None)
    assert isinstance(e, HFEngine) and e.max_batch == 2
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine(SimpleNamespace(engine="foo"), TINY, None)
    with pytest.raises(ValueError, match="empty"):
        e.generate([[1], []], sp)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_vllm_engine_errors_clearly_without_vllm():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm installed: the GPU check covers it")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="vllm"):
        make_engine(SimpleNamespace(engine="vllm"), TINY, None)


# ------------------------------------------------------------------- sampled-token log-probs and stops
from egrsd_megatron.config.schema import ConfigError  # noqa: E402
from egrsd_megatron.rollout.base import Completion, stop_sequences_from_strings  # noqa: E402
from egrsd_megatron.rollout.sampling import check_training_sampling  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)


@torch.no_grad()
def _full_forward_logits(model: torch.nn.Module, prompt, response) -> torch.Tensor:
    """fp32 logits predicting each response token, from ONE uncached, unpadded forward over prompt+response."""
    seq = torch.tensor([list(prompt) + list(response)])
    logits = model(input_ids=seq, use_cache=False).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def _logit_tol(model: torch.nn.Module, logits: torch.Tensor, temperature: float) -> float:
    """Derived bound on |engine log-prob - reference log-prob|.

    Both sides run the same fp32 model; they differ only in rounding (KV cache + left padding + batch vs one
    full forward). Each logit passes through n_layers x 3 matmul chains plus the head, each a sum of at most
    K = max(hidden, intermediate) terms: relative error <= (3 n_layers + 1) K eps32 of the logit scale
    M = max |z|. A log-prob of softmax(z / T) moves by at most 2 max_v |dz_v| / T.
    """
    c = model.config
    k = max(c.hidden_size, c.intermediate_size)
    return 2.0 * (3 * c.num_hidden_layers + 1) * k * EPS32 * float(logits.abs().max()) / temperature


@pytest.mark.parametrize("extra", [{}, {"top_k": 20}, {"top_p": 0.8}], ids=["full", "top_k", "top_p"])
def test_logprobs_at_temperature_match_full_forward(extra):
    model = _model(2)
    t = 0.7
    params = SamplingParams(temperature=t, max_new_tokens=10, **extra)
    outs = HFEngine(model, max_batch=3).generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    worst = 0.0
    for p, c in zip(PROMPTS, outs):
        assert len(c.logprobs) == len(c.response_ids) == 10
        z = _full_forward_logits(model, p, c.response_ids)
        # The distribution sampled from: log_softmax(z / T), truncated (and renormalised) when top-k/p is on.
        ref = torch.log_softmax(filter_logits(z, params), -1).gather(1, torch.tensor(c.response_ids)[:, None])[:, 0]
        ours = torch.tensor(c.logprobs)
        tol = _logit_tol(model, z, t)
        err = float((ours - ref).abs().max())
        worst = max(worst, err)
        assert err <= tol, f"prompt {p}: |logprob - reference| = {err:.3g} > derived tol {tol:.3g}"
        if not extra:
            # Negative control: the T = 1 log-probs are far from what the engine returned.
            at_one = torch.log_softmax(z, -1).gather(1, torch.tensor(c.response_ids)[:, None])[:, 0]
            assert float((at_one - ours).abs().max()) > 100 * tol
    assert worst < 1e-4  # fp32 agreement in practice (the bound above is the worst case)


def test_greedy_logprob_is_log_softmax_at_temperature_one(engine):
    outs = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=6))
    for p, c in zip(PROMPTS, outs):
        z = _full_forward_logits(engine.model, p, c.response_ids)
        ref = torch.log_softmax(z, -1).gather(1, torch.tensor(c.response_ids)[:, None])[:, 0]
        assert float((torch.tensor(c.logprobs) - ref).abs().max()) <= _logit_tol(engine.model, z, 1.0)


def test_stop_sequence_ends_row_and_is_kept(engine):
    ref = greedy_reference(engine.model, PROMPTS[0], 12)
    seq = ref[3:5]
    first = next(i for i in range(1, 12) if ref[i - 1 : i + 1] == seq)  # first position where seq is complete
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_sequences=[seq])
    out = engine.generate(PROMPTS, params)
    assert out[0].response_ids == ref[: first + 1] and out[0].response_ids[-2:] == seq and not out[0].truncated
    assert len(out[0].logprobs) == len(out[0].response_ids)
    for p, c in zip(PROMPTS[1:], out[1:]):
        r = greedy_reference(engine.model, p, 12)
        hit = next((i for i in range(1, 12) if r[i - 1 : i + 1] == seq), None)
        assert c.response_ids == (r if hit is None else r[: hit + 1])
        assert c.truncated == (hit is None)


def test_stop_strings_map_through_the_tokenizer():
    class Tok:
        def encode(self, s, add_special_tokens=False):
            return [ord(ch) % 96 for ch in s]

    cfg = SimpleNamespace(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, stop=["ab", "</x>"])
    p = SamplingParams.from_config(cfg, [3], tokenizer=Tok())
    assert p.stop_sequences == [[97 % 96, 98 % 96], [ord(c) % 96 for c in "</x>"]] and p.stop_token_ids == [3]
    assert p.ends_with_stop([7, 1, 2]) and p.ends_with_stop([5, 3]) and not p.ends_with_stop([2, 1])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        SamplingParams.from_config(cfg, [3])
    with pytest.raises(ValueError, match=r"rollout.stop\[0\] = ''"):
        stop_sequences_from_strings([""], Tok())


def test_completion_logprobs_must_align():
    with pytest.raises(ValueError, match="2 logprobs for 3 response ids"):
        Completion(prompt_ids=[1], response_ids=[1, 2, 3], text="", truncated=True, logprobs=[0.0, 0.0])


@pytest.mark.parametrize(
    "key,over,why",
    [
        ("rollout.temperature", {"temperature": 0.0}, "identical"),
        ("rollout.top_p", {"top_p": 0.9}, "off-policy"),
        ("rollout.top_k", {"top_k": 20}, "off-policy"),
    ],
)
def test_check_training_sampling_refuses(key, over, why):
    cfg = SimpleNamespace(**{"temperature": 0.7, "top_p": 1.0, "top_k": 0, **over})
    with pytest.raises(ConfigError, match=rf"'{key}'.*{why}"):
        check_training_sampling(cfg)


def test_check_training_sampling_accepts_plain_sampling():
    for t in (0.7, 1.0, 1.3):
        check_training_sampling(SimpleNamespace(temperature=t, top_p=1.0, top_k=0))


@pytest.mark.parametrize("over", [{}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8, "temperature": 1.3}])
def test_select_next_is_the_inverse_cdf_of_each_rows_uniform(over):
    """Row i's token is the first v whose float64 cdf exceeds u_i * total, u_i the next double of row i's
    generator (a plain-Python reference); its log-prob is log softmax of the filtered logits; each row
    consumes exactly one double; a row alone draws what it draws in the batch; filtered tokens never."""
    params = SamplingParams(max_new_tokens=1, **over)
    torch.manual_seed(0)
    for trial in range(20):
        logits = torch.randn(6, 4099) * (1 + trial % 4)
        seeds = [1000 * trial + i for i in range(6)]
        x = filter_logits(logits, params)
        probs = torch.softmax(x, dim=-1)
        ref = []
        for i, s in enumerate(seeds):
            u = float(torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(s)))
            row = probs[i].double().tolist()
            target, acc = u * sum(row), 0.0
            ref.append(next(v for v, p in enumerate(row) if (acc := acc + p) > target and p > 0))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        tok, lp = select_next(logits, params, gens)
        assert tok.tolist() == ref
        assert torch.equal(lp, torch.log_softmax(x, dim=-1)[torch.arange(6), tok])
        assert bool(torch.isfinite(x[torch.arange(6), tok]).all())  # never a filtered token
        after = [torch.Generator().manual_seed(s) for s in seeds]
        for g in after:
            torch.rand((), dtype=torch.float64, generator=g)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, after))
        alone, _ = select_next(logits[3:4], params, [torch.Generator().manual_seed(seeds[3])])
        assert int(alone[0]) == ref[3]


def test_select_next_frequencies_match_the_distribution():
    """200k draws from a fixed 6-token distribution (one filtered to 0 by top-k): each frequency within 5
    binomial standard deviations, sqrt(p (1 - p) / N), of softmax's p (fixed seeds: deterministic). 5 sd is
    1% of the largest p (0.56) and 9% of the smallest (0.028): a sampler biased by more fails."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0, -9.0])
    params = SamplingParams(max_new_tokens=1, top_k=5)
    p = torch.softmax(filter_logits(logits[None], params), dim=-1)[0].double()
    rows, calls = 4000, 50
    counts = torch.zeros(6, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    for _ in range(calls):
        tok, _ = select_next(logits.expand(rows, -1), params, gens)
        counts += torch.bincount(tok, minlength=6).double()
    n = rows * calls
    assert counts[5] == 0  # filtered out: probability exactly 0
    sd = torch.sqrt(p * (1 - p) / n)
    assert bool((torch.abs(counts / n - p)[:5] <= 5 * sd[:5]).all()), (counts / n, p)


def test_inverse_cdf_never_returns_a_zero_probability_token_at_the_edges():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [0.25, 0.0, 0.75, 0.0, 0.0]])  # exact in fp32
    top = torch.tensor([1 - 2.0**-53, 1 - 2.0**-53], dtype=torch.float64)
    assert inverse_cdf(probs, top).tolist() == [2, 2]
    assert inverse_cdf(probs, torch.zeros(2, dtype=torch.float64)).tolist() == [1, 0]
    assert inverse_cdf(probs, torch.tensor([0.5, 0.25], dtype=torch.float64)).tolist() == [2, 2]


def test_select_next_refuses_nan_rows():
    logits = torch.zeros(3, 10)
    logits[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        select_next(logits, SamplingParams(max_new_tokens=1), [torch.Generator().manual_seed(i) for i in range(3)])
