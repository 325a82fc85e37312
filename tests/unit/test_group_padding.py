"""KV-group zero padding in the per-tensor layout (no processes): shard_from_hf fills padding groups with
zeros, hf_from_shards drops them bit-identically and refuses non-zero padding, naming the parameter."""

from __future__ import annotations

import pytest
import torch

from egrsd_megatron.checkpoint.layout import hf_from_shards, layer_params, shard_from_hf
from egrsd_megatron.models import ModelArch
from egrsd_megatron.models.group_padding import padding_view, real_local_groups

ARCH = ModelArch(
    num_layers=1,
    hidden_size=96,
    num_attention_heads=6,
    num_kv_heads=3,
    head_dim=16,
    ffn_hidden_size=96,
    vocab_size=200,
    family="llama",
    qk_norm=False,
)


def _attn_maps():
    pms = {pm.kind: pm for pm in layer_params(ARCH, 0)}
    return pms["qkv"], pms["proj"]


def _hf_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(6 * 16, 96, generator=g)
    k = torch.randn(3 * 16, 96, generator=g)
    v = torch.randn(3 * 16, 96, generator=g)
    o = torch.randn(96, 6 * 16, generator=g)
    return q, k, v, o


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 5])
def test_roundtrip_bit_identical_and_padding_zero(tp):
    qkv, proj = _attn_maps()
    q, k, v, o = _hf_tensors()
    gm = ARCH.megatron_groups(tp)
    gl = gm // tp
    s_qkv = [shard_from_hf(qkv, (q, k, v), ARCH, tp, r) for r in range(tp)]
    s_o = [shard_from_hf(proj, (o,), ARCH, tp, r) for r in range(tp)]
    assert all(s.shape == (gl * 4 * 16, 96) for s in s_qkv)
    assert all(s.shape == (96, gl * 2 * 16) for s in s_o)
    assert sum(real_local_groups(ARCH, tp, r) for r in range(tp)) == 3
    for r in range(tp):
        assert not padding_view("qkv", s_qkv[r], ARCH, tp, r).any()
        assert not padding_view("proj", s_o[r], ARCH, tp, r).any()
        # real groups are never all zero (random input): the padding view does not swallow real heads
        n_real = real_local_groups(ARCH, tp, r)
        assert padding_view("qkv", s_qkv[r], ARCH, tp, r).shape[0] == gl - n_real
    back = hf_from_shards(qkv, s_qkv, ARCH)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    assert torch.equal(hf_from_shards(proj, s_o, ARCH)[0], o)
    # Megatron-side group i = HF KV group i (q heads 2i, 2i+1; k/v head i) for the real groups.
    full = torch.cat(s_qkv).view(gm, 4 * 16, 96)
    assert (
        torch.equal(full[1, :32], q[32:64])
        and torch.equal(full[1, 32:48], k[16:32])
        and torch.equal(full[1, 48:], v[16:32])
    )


def test_nonzero_padding_is_refused_naming_the_layer():
    qkv, proj = _attn_maps()
    q, k, v, o = _hf_tensors()
    s_qkv = [shard_from_hf(qkv, (q, k, v), ARCH, 2, r) for r in range(2)]
    s_o = [shard_from_hf(proj, (o,), ARCH, 2, r) for r in range(2)]
    padding_view("qkv", s_qkv[1], ARCH, 2, 1)[0, -1, 3] = 1e-30  # one tiny value in v of the padded group
    with pytest.raises(
        ValueError,
        match=r"decoder\.layers\.0\.self_attention\.linear_qkv\.weight \(layer 0\).*"
        r"zero-padding KV group.*TP=2.*non-zero",
    ):
        hf_from_shards(qkv, s_qkv, ARCH)
    padding_view("proj", s_o[1], ARCH, 2, 1)[5, 0, 0] = -2.0
    with pytest.raises(ValueError, match=r"linear_proj\.weight \(layer 0\).*non-zero"):
        hf_from_shards(proj, s_o, ARCH)


def test_padded_conversion_metadata_and_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    from egrsd_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from egrsd_megatron.checkpoint.layout import hf_shapes
    from egrsd_megatron.checkpoint.megatron_format import read_checkpoint_metadata
    from egrsd_megatron.utils.atomic import atomic_write_json

    g = torch.Generator().manual_seed(3)
    src = tmp_path / "hf"
    src.mkdir()
    sd = {n: torch.randn(s, generator=g) for n, s in hf_shapes(ARCH).items()}
    save_file(sd, str(src / "model.safetensors"))
    atomic_write_json(str(src / "config.json"), ARCH.to_hf_config())
    ck = hf_to_megatron(str(src), str(tmp_path / "meg"), tp=2)
    meta = read_checkpoint_metadata(ck)
    assert (meta["megatron_query_groups"], meta["megatron_attention_heads"], meta["padded_kv_groups"]) == (4, 8, 1)
    a = meta["megatron_lm_args"]
    assert (a[a.index("--num-query-groups") + 1], a[a.index("--num-attention-heads") + 1]) == ("4", "8")
    rank1 = torch.load(f"{ck}/release/mp_rank_01/model_optim_rng.pt", weights_only=True)["model"]
    w = rank1["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert w.shape == (2 * 4 * 16, 96) and not w[64:].any() and w[:64].abs().min() > 0
    out = megatron_to_hf(ck, str(tmp_path / "back"))
    got = load_file(f"{out}/model-00001-of-00001.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[n], sd[n]) for n in sd)
