"""Checkpoints across TP/PP layouts, from the shared 4-rank spawn of test_model_parallel_equivalence:
- offline conversions written at TP1 and TP2xPP2 load at every layout (TP1, TP2, PP2, TP2xPP2) with
  bit-identical weights and logits (same layout: GPTModel.load_state_dict(strict=True), Megatron-LM's call);
- save_model_checkpoint at every layout -> megatron_to_hf gives the original safetensors bit for bit."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_model_parallel_equivalence import LAYOUTS, distributed_results


@pytest.mark.slow
def test_offline_checkpoints_load_at_every_layout():
    _, _, results, _ = distributed_results()
    checked = 0
    for r in results:
        for key, v in r.items():
            for src in ("tp1pp1", "tp2pp2"):
                if key.startswith(("qwen3_untied", "qwen3_tied")):
                    assert v[f"load_{src}_mismatch"] == [], (key, src)
                    assert v[f"load_{src}_logits_equal"] is True, (key, src)
                    checked += 1
    assert checked == 4 * 2 * len(LAYOUTS) * 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen3_untied", "qwen3_tied"])
def test_saved_checkpoints_convert_back_bit_identical(case, tmp_path):
    from egrsd_megatron.checkpoint.convert import megatron_to_hf
    from egrsd_megatron.checkpoint.megatron_format import read_checkpoint_metadata

    root, hf_dirs, _, _ = distributed_results()
    ref = load_file(os.path.join(hf_dirs[case], "model.safetensors"))
    for tp, pp in LAYOUTS:
        ck = os.path.join(root, "saved", f"{case}_tp{tp}pp{pp}")
        meta = read_checkpoint_metadata(ck)
        assert (meta["tp"], meta["pp"]) == (tp, pp)
        assert meta["tokenizer"] is None or os.path.isdir(os.path.join(ck, meta["tokenizer"]))
        out = megatron_to_hf(ck, str(tmp_path / f"hf_tp{tp}pp{pp}"))
        got = {}
        for f in glob.glob(os.path.join(out, "*.safetensors")):
            got.update(load_file(f))
        assert set(got) == set(ref)
        # Bitwise: conversion only slices, concatenates and copies tensors (no arithmetic), at any layout.
        assert all(torch.equal(got[k], ref[k]) for k in ref), (tp, pp)
    assert not glob.glob(os.path.join(root, "saved", "*.tmp-*"))
