"""Issue 16: packed sequences (PackedSeqParams, THD) through Megatron's GPTModel on CPU.

One spawn of 2 gloo ranks runs TP=1 (x DP2), TP=2 and PP=2 (pack padded to the budget: PP's fixed shape).
For a pack of 4 sequences of a tiny Qwen3 (random HF checkpoint, norms randomised):
(a) the response logits equal the padded batch's and Hugging Face transformers' (each sequence alone);
(b) changing one sequence leaves the others' logits unchanged: bitwise at equal length, to the tolerance
    when its length (and so every later sequence's offset) changes;
(c) the gradients of a packed loss equal the padded loss's.
A negative control shows the tolerance catches the bug packing exists to avoid: one segment for the
whole pack (attention across sequences, RoPE positions running on).

Tolerances (fp32, unit roundoff u = eps/2, relative to the reference's max |value|): a K-term dot product
in fp32 is within K u sum|terms| of exact (Higham, gamma_K); the two computations differ only in the
order of such sums (GEMM blocking for a different row count, zero-probability padded keys), so their
difference is bounded by the sum of K over the reductions on the path: per layer hidden (q/k/v and the
MLP input), head_dim (scores), sequence (probs x V), heads x head_dim (attention output), ffn (MLP
output), then the output layer's hidden. Gradients go back through the same reductions and add one over
the tokens (weight gradients). Each bound is then x 2 for the two computations' errors.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Dict, List

import numpy as np
import pytest
import torch

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
PROMPTS = [3, 2, 4, 1]  # prompt lengths (response starts)
LENGTHS = [9, 5, 12, 7]  # sequence lengths: 33 tokens
BUDGET = 40  # pack padded to the budget: a padding segment of 7 tokens
SHORTER = 3  # (b): sequence 1 shortened by this many tokens
EPS = float(np.finfo(np.float32).eps)


def _arch():
    from egrsd_megatron.models import PRESETS

    return PRESETS["qwen3_tiny"]


def _k_path(arch, seq_len: int) -> int:
    per_layer = (
        arch.hidden_size
        + arch.head_dim
        + seq_len
        + arch.num_attention_heads * arch.head_dim
        + arch.ffn_hidden_size
        + arch.hidden_size
    )  # q/k/v, scores, probs x V, out proj, fc1, fc2
    return arch.num_layers * per_layer + arch.hidden_size


def logits_tol(arch) -> float:
    return 2 * (EPS / 2) * _k_path(arch, max(LENGTHS))


def grads_tol(arch) -> float:
    return 2 * (EPS / 2) * (2 * _k_path(arch, max(LENGTHS)) + BUDGET)


def sequences(vocab: int, variant: str = "base") -> List[List[int]]:
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    if variant == "changed":  # sequence 1: other tokens, same length
        seqs[1] = torch.randint(0, vocab, (LENGTHS[1],), generator=g).tolist()
    elif variant == "shorter":  # sequence 1: other tokens, shorter (later offsets move)
        seqs[1] = torch.randint(0, vocab, (LENGTHS[1] - SHORTER,), generator=g).tolist()
    return seqs


def loss_weights(arch, padded_vocab: int) -> torch.Tensor:
    """W [n, R, V_padded]: loss = sum(response logits x W) over valid slots (padded columns weigh 0)."""
    g = torch.Generator().manual_seed(5)
    r = max(n - p for n, p in zip(LENGTHS, PROMPTS))
    w = torch.zeros(len(LENGTHS), r, padded_vocab)
    w[..., : arch.vocab_size] = torch.randn(len(LENGTHS), r, arch.vocab_size, generator=g)
    return w


def _padded_resp_pos(prompts, lengths) -> torch.Tensor:
    r = max(n - p for n, p in zip(lengths, prompts))
    pos = torch.zeros(len(lengths), r, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        pos[i, : n - p] = torch.arange(p - 1, n - 1)
    return pos


def _schedule(model, batch, seq_len: int, mbs: int, forward_step, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for p in model.parameters():
        p.grad = None
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def _run_packed(model, pack, w, mask, forward_only: bool, cu_override=None):
    """Response logits [n, R, V_local] of `pack` (last stage, else None), backward of sum(resp x W)."""
    from egrsd_megatron.data.packing import gather_response_logits
    from egrsd_megatron.models import packed_seq_params

    cu = pack.cu_seqlens if cu_override is None else cu_override
    lens = cu[1:] - cu[:-1]
    params = packed_seq_params(cu, int(lens.max()))
    kept = []

    def loss_func(out):
        resp = gather_response_logits(out, pack)
        kept.append(resp.detach().clone())
        return (resp * w * mask[..., None]).sum(), {}

    def step(it, mdl):
        p = next(it)
        return mdl(
            input_ids=p.input_ids, position_ids=p.position_ids, attention_mask=None, packed_seq_params=params
        ), loss_func

    _schedule(model, pack, pack.input_ids.shape[1], 1, step, forward_only)
    return kept[0] if kept else None


def _run_padded(model, seqs, w, mask):
    from egrsd_megatron.models import causal_mask
    from egrsd_megatron.trainer.batch import gather_positions

    lmax = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), lmax, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    pos = torch.arange(lmax).unsqueeze(0).expand(len(seqs), lmax)
    resp_pos = _padded_resp_pos(PROMPTS, [len(s) for s in seqs])
    kept = []

    def loss_func(out):
        resp = gather_positions(out, resp_pos)
        kept.append(resp.detach().clone())
        return (resp * w * mask[..., None]).sum(), {}

    def step(it, mdl):
        return mdl(input_ids=next(it), position_ids=pos, attention_mask=causal_mask(lmax, ids.device)), loss_func

    _schedule(model, ids, lmax, len(seqs), step, forward_only=False)
    return kept[0] if kept else None


def attention_reference(q, k, v, bounds) -> torch.Tensor:
    """float64 block-diagonal causal GQA attention: q [T, np, hn], k/v [T, ng, hn] -> [T, np * hn]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.zeros_like(q)
    for a, b in zip(bounds, bounds[1:]):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) / q.shape[-1] ** 0.5
        s = s.masked_fill(torch.triu(torch.ones(b - a, b - a, dtype=torch.bool), 1), float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b])
    return out.reshape(q.shape[0], -1)


def _core_attention_error(model, arch) -> float:
    """This rank's PackedDotProductAttention on random q/k/v vs attention_reference (relative to max |ref|)."""
    from egrsd_megatron.models import packed_seq_params
    from egrsd_megatron.models.packed_attention import PackedDotProductAttention

    core = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, PackedDotProductAttention)
    g = torch.Generator().manual_seed(13)
    heads, groups = core.num_attention_heads_per_partition, core.num_query_groups_per_partition
    q = torch.randn(BUDGET, heads, arch.head_dim, generator=g)
    k, v = (torch.randn(BUDGET, groups, arch.head_dim, generator=g) for _ in range(2))
    cu = torch.tensor([0] + list(np.cumsum(LENGTHS)) + [BUDGET], dtype=torch.int32)
    with torch.no_grad():
        got = core(q, k, v, None, packed_seq_params=packed_seq_params(cu, int((cu[1:] - cu[:-1]).max())))
    ref = attention_reference(q, k, v, cu.tolist())
    return float((got.double() - ref).abs().max() / ref.abs().max())


def worker(rank: int, world: int, hf_dir: str):
    from megatron.core import parallel_state as ps

    from egrsd_megatron.checkpoint.hf_mapping import gather_hf_state_dict, load_hf_weights
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.data.packing import pack_sequences
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import ModelArch, build_model, vocab_slice

    arch = ModelArch.from_hf_config(hf_dir)
    out: Dict[str, dict] = {}
    for tp, pp in LAYOUTS:
        info = init_distributed(tp=tp, pp=pp, seed=1234)
        model = build_model(arch, ModelConfig())
        load_hf_weights(model, arch, hf_dir)
        lo, hi, _ = vocab_slice(arch, tp, ps.get_tensor_model_parallel_rank())
        w = loss_weights(arch, arch.padded_vocab_size(tp))[..., lo:hi]
        seqs = sequences(arch.vocab_size)
        pack = pack_sequences(seqs, PROMPTS, pad_to=BUDGET)
        r = {"tp_rank": info.tp_rank, "dp_rank": info.dp_rank, "mask": pack.mask}
        r["attn_err"] = _core_attention_error(model, arch) if ps.is_pipeline_first_stage() else None
        r["padded"] = _run_padded(model, seqs, w, pack.mask)
        r["padded_grads"] = dict(gather_hf_state_dict(model, arch, grads=True))
        r["packed"] = _run_packed(model, pack, w, pack.mask, forward_only=False)
        r["packed_grads"] = dict(gather_hf_state_dict(model, arch, grads=True))
        r["packed_unpadded"] = (
            _run_packed(model, pack_sequences(seqs, PROMPTS), w, pack.mask, True) if pp == 1 else None
        )
        for variant in ("changed", "shorter"):
            s2 = sequences(arch.vocab_size, variant)
            p2 = pack_sequences(s2, PROMPTS, pad_to=BUDGET)
            r[variant] = _run_packed(model, p2, w[:, : p2.mask.shape[1]], p2.mask, forward_only=True)
        # Negative control: the whole pack as ONE segment (cross-sequence attention, RoPE positions run on).
        one = torch.tensor([0, BUDGET], dtype=torch.int32)
        r["one_segment"] = _run_packed(model, pack, w, pack.mask, forward_only=True, cu_override=one)
        out[f"tp{tp}pp{pp}"] = r
    return out


def hf_reference(hf_dir: str) -> List[np.ndarray]:
    """transformers logits of each sequence run alone, at its response positions [R_i, V]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for s, p in zip(sequences(_arch().vocab_size), PROMPTS):
            logits = model(torch.tensor([s])).logits[0]
            out.append(logits[p - 1 : len(s) - 1].numpy())
    return out


@functools.lru_cache(maxsize=1)
def results():
    from egrsd_megatron.testing.spawn import run_distributed
    from egrsd_megatron.testing.tiny import save_random_hf_model

    root = tempfile.mkdtemp(prefix="egrsd_packing_")
    hf_dir = save_random_hf_model(_arch(), os.path.join(root, "hf"), seed=3, randomize_norms=True)
    return run_distributed(worker, 2, hf_dir, timeout=600), hf_reference(hf_dir)


def full(res, layout: str, key: str, vocab: int):
    """TP slices of the last stage (DP rank 0) concatenated over the vocabulary, padding columns dropped."""
    parts = sorted(
        (r[layout]["tp_rank"], r[layout][key]) for r in res if r[layout][key] is not None and r[layout]["dp_rank"] == 0
    )
    return np.concatenate([p for _, p in parts], axis=-1)[..., :vocab]


def max_rel(a, b, mask) -> float:
    a, b = np.asarray(a, np.float64)[mask], np.asarray(b, np.float64)[mask]
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_packed_logits_equal_padded_and_transformers(layout):
    res, hf = results()
    arch, tol = _arch(), logits_tol(_arch())
    mask = res[0][layout]["mask"]
    packed, padded = full(res, layout, "packed", arch.vocab_size), full(res, layout, "padded", arch.vocab_size)
    assert max_rel(packed, padded, mask) <= tol
    for i, ref in enumerate(hf):
        assert max_rel(packed[i, : len(ref)], ref, slice(None)) <= tol, (layout, i)
    if layout.endswith("pp1"):  # the same pack without its padding segment
        assert max_rel(full(res, layout, "packed_unpadded", arch.vocab_size), packed, mask) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_no_attention_across_sequences(layout):
    res, _ = results()
    arch = _arch()
    packed = full(res, layout, "packed", arch.vocab_size)
    mask = res[0][layout]["mask"]
    others = [0, 2, 3]
    changed = full(res, layout, "changed", arch.vocab_size)
    # Same shapes and offsets: every op on another sequence's rows is the same computation, bitwise.
    assert np.array_equal(changed[others], packed[others])
    assert not np.allclose(changed[1], packed[1])  # the change itself is visible
    shorter = full(res, layout, "shorter", arch.vocab_size)
    r = shorter.shape[1]
    assert max_rel(shorter[others], packed[others][:, :r], mask[others][:, :r]) <= logits_tol(arch)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"tp{tp}pp{pp}" for tp, pp in LAYOUTS])
def test_packed_grads_equal_padded(layout):
    res, _ = results()
    g_packed, g_padded = res[0][layout]["packed_grads"], res[0][layout]["padded_grads"]
    assert set(g_packed) == set(g_padded) and g_packed
    tol = grads_tol(_arch())
    for n in g_padded:
        assert max_rel(g_packed[n], g_padded[n], slice(None)) <= tol, (layout, n)
    # and identical across layouts to the same bound (TP/PP change only the order of sums)
    base = res[0]["tp1pp1"]["packed_grads"]
    for n in base:
        assert max_rel(g_packed[n], base[n], slice(None)) <= tol, (layout, n)


@pytest.mark.slow
def test_core_attention_matches_float64_block_diagonal_math():
    """PackedDotProductAttention alone (GQA: 2 query heads per KV group; at TP=2 one group per rank).
    Tolerance (fp32 vs float64, so one computation's error): the scores reduction (head_dim terms), the
    softmax normaliser and probs x V (longest-segment terms each), + 4 roundings (scale, exp, divide, cast)."""
    res, _ = results()
    tol = (EPS / 2) * (_arch().head_dim + 2 * max(LENGTHS) + 4)
    errs = [r[k]["attn_err"] for r in res for k in r if r[k]["attn_err"] is not None]
    assert len(errs) >= 4 and max(errs) <= tol, errs


@pytest.mark.slow
def test_negative_control_one_segment_is_caught():
    """Cross-sequence attention + running RoPE positions must exceed the tolerance by far (x100)."""
    res, _ = results()
    arch = _arch()
    packed = full(res, "tp1pp1", "packed", arch.vocab_size)
    wrong = full(res, "tp1pp1", "one_segment", arch.vocab_size)
    mask = res[0]["tp1pp1"]["mask"].copy()
    mask[0] = False  # sequence 0 starts the pack: unaffected by either bug
    assert max_rel(wrong, packed, mask) > 100 * logits_tol(arch)
