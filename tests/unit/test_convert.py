"""Offline conversion HF <-> Megatron (no process group): bit-identical round trips at several TP/PP,
rank-file contents against the mapping, transformers loading of the output, bad input, atomic output, CLI."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from egrsd_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
from egrsd_megatron.checkpoint.layout import hf_from_shards, layer_params, shard_from_hf
from egrsd_megatron.checkpoint.megatron_format import rank_file, read_checkpoint_metadata
from egrsd_megatron.config.schema import ConfigError
from egrsd_megatron.models import PRESETS
from tests.distributed.test_model_parallel_equivalence import make_hf_checkpoint


def _load_all(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        c: make_hf_checkpoint(c, str(root / c), seed=i)
        for i, c in enumerate(("qwen3_untied", "qwen3_tied", "llama_tied"))
    }


@pytest.mark.parametrize(
    "case,tp,pp",
    [
        ("qwen3_untied", 1, 1),
        ("qwen3_untied", 2, 1),
        ("qwen3_untied", 2, 2),
        ("qwen3_tied", 1, 2),
        ("qwen3_tied", 2, 2),
        ("llama_tied", 2, 1),
    ],
)
def test_round_trip_bit_identical_and_loadable(hf_dirs, tmp_path, case, tp, pp):
    from transformers import AutoModelForCausalLM

    src = hf_dirs[case]
    ck = hf_to_megatron(src, str(tmp_path / "meg"), tp=tp, pp=pp)
    meta = read_checkpoint_metadata(ck)
    assert (meta["tp"], meta["pp"], meta["dtype"]) == (tp, pp, "float32")
    assert meta["padded_vocab_size"] == 128 * tp * ((200 + 128 * tp - 1) // (128 * tp))
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "release"
    out = megatron_to_hf(ck, str(tmp_path / "hf2"), max_shard_bytes=40_000)  # force several shards
    a, b = _load_all(src), _load_all(out)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: conversion only slices and copies tensors
    idx = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(idx["weight_map"]) == set(a) and len(set(idx["weight_map"].values())) > 1
    m1 = AutoModelForCausalLM.from_pretrained(src)
    m2 = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 200, (2, 6))
    # Bitwise: bit-identical weights (checked above) in one process and thread count: the same kernels, same order.
    assert torch.equal(m1(ids).logits, m2(ids).logits)


def test_rank_files_follow_the_mapping(hf_dirs, tmp_path):
    """Independent check of the layout: per-group QKV, gate/up per TP rank, zero vocab padding, stage numbering."""
    src = hf_dirs["qwen3_untied"]
    hf = load_file(os.path.join(src, "model.safetensors"))
    ck = hf_to_megatron(src, str(tmp_path / "meg"), tp=2, pp=2)
    r1 = torch.load(rank_file(ck, 1, 1, 2), weights_only=True)["model"]  # TP rank 1, stage 1 (global layer 1)
    assert r1["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    k = hf["model.layers.1.self_attn.k_proj.weight"]
    v = hf["model.layers.1.self_attn.v_proj.weight"]
    # group 1 (of 2) lives on TP rank 1: its 2 q heads (16 rows each), then its k head, then its v head
    expect = torch.cat([q[32:64], k[16:32], v[16:32]])
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_qkv.weight"], expect)
    g, u = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([g[64:], u[64:]]))
    assert torch.equal(
        r1["decoder.layers.0.self_attention.linear_proj.weight"], hf["model.layers.1.self_attn.o_proj.weight"][:, 32:]
    )
    out = r1["output_layer.weight"]  # vocab rows 128..255, 200..255 padding
    assert torch.equal(out[:72], hf["lm_head.weight"][128:200]) and not out[72:].any()
    assert "embedding.word_embeddings.weight" not in r1 and r1["output_layer._extra_state"] is None
    r0 = torch.load(rank_file(ck, 0, 0, 2), weights_only=True)["model"]
    assert torch.equal(r0["embedding.word_embeddings.weight"], hf["model.embed_tokens.weight"][:128])
    assert "decoder.final_layernorm.weight" not in r0 and "decoder.layers.1.input_layernorm.weight" not in r0


def test_shard_functions_invert_each_other():
    arch = PRESETS["qwen3_tiny"]
    g = torch.Generator().manual_seed(0)
    for pm in layer_params(arch, 0):
        from egrsd_megatron.checkpoint.layout import hf_shapes

        full = [torch.randn(hf_shapes(arch)[n], generator=g) for n in pm.hf_names]
        for tp in (1, 2):
            back = hf_from_shards(pm, [shard_from_hf(pm, full, arch, tp, r) for r in range(tp)], arch)
            assert all(torch.equal(x, y) for x, y in zip(back, full)), (pm.mname, tp)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bad_inputs_name_the_tensor_and_file(hf_dirs, tmp_path):
    src = hf_dirs["qwen3_untied"]
    st = os.path.join(src, "model.safetensors")
    sd = load_file(st)

    def variant(name, tensors=None, cfg_patch=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        if cfg_patch:
            c = json.load(open(d / "config.json"))
            c.update(cfg_patch)
            json.dump(c, open(d / "config.json", "w"))
        return str(d)

    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor.*layers\.1\.mlp\.up_proj"):
        hf_to_megatron(variant("missing", missing), str(tmp_path / "o1"))
    extra = dict(sd, **{"model.layers.1.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*layers\.1\.mlp\.extra"):
        hf_to_megatron(variant("extra", extra), str(tmp_path / "o2"))
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight has "
        r"shape \[16, 64\].*\[32, 64\]",
    ):
        hf_to_megatron(variant("shape", bad), str(tmp_path / "o3"))
    with pytest.raises(ValueError, match=r"intermediate_size|mlp.gate_proj.weight has shape"):
        hf_to_megatron(variant("cfg", cfg_patch={"intermediate_size": 96}), str(tmp_path / "o4"))
    with pytest.raises(ConfigError, match="does not divide ffn_hidden_size=128"):
        hf_to_megatron(src, str(tmp_path / "o5"), tp=3)
    with pytest.raises(ConfigError, match="unknown architecture"):
        hf_to_megatron(
            variant("arch", cfg_patch={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
            str(tmp_path / "o6"),
        )
    # nothing was left behind, not even a temp folder
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]


def test_output_never_half_written(hf_dirs, tmp_path, monkeypatch):
    import egrsd_megatron.checkpoint.convert as conv

    calls = {"n": 0}
    real = conv.write_rank_file

    def failing(path, sd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(path, sd)

    monkeypatch.setattr(conv, "write_rank_file", failing)
    with pytest.raises(OSError, match="disk full"):
        hf_to_megatron(hf_dirs["qwen3_untied"], str(tmp_path / "out"), tp=2)
    assert os.listdir(tmp_path) == []
    # an existing output is refused before any work
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        hf_to_megatron(hf_dirs["qwen3_untied"], str(tmp_path / "busy"))


def test_corrupt_checkpoint_errors(hf_dirs, tmp_path):
    ck = hf_to_megatron(hf_dirs["qwen3_tied"], str(tmp_path / "meg"), tp=2)
    os.remove(rank_file(ck, 1, 0, 1))
    with pytest.raises(FileNotFoundError, match=r"mp_rank_01/model_optim_rng.pt is missing"):
        megatron_to_hf(ck, str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="egrsd_checkpoint.json"):
        megatron_to_hf(str(tmp_path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_cli_and_recipe(hf_dirs, tmp_path):
    import subprocess
    import sys

    from egrsd_megatron.cli import main

    assert (
        main(
            [
                "convert",
                "hf-to-megatron",
                "--hf",
                hf_dirs["llama_tied"],
                "--out",
                str(tmp_path / "m"),
                "--tp",
                "2",
                "--pp",
                "2",
            ]
        )
        == 0
    )
    assert main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "h")]) == 0
    assert (
        main(["convert", "hf-to-megatron", "--hf", hf_dirs["llama_tied"], "--out", str(tmp_path / "x"), "--tp", "3"])
        == 2
    )
    a, b = _load_all(hf_dirs["llama_tied"]), _load_all(str(tmp_path / "h"))
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "recipes", "convert.py"),
            "megatron-to-hf",
            "--ckpt",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "h2"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "h2" / "config.json")
