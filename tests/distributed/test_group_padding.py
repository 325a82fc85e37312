"""KV-group zero padding (ModelArch.megatron_groups): a tiny model with 3 KV groups (6 heads, head_dim 16,
3 layers) runs at TP=2 (groups padded 3 -> 4), TP=3 (no padding) and TP=2 x PP=3, and gives transformers'
and TP=1's logits and per-HF-parameter gradients (fp32, to the tolerances derived in
test_model_parallel_equivalence: `logits_tol`, `grads_tol`), for Qwen3 (untied, QK-norm) and
Llama (tied). The padded weights and their gradients are exactly zero and stay exactly zero after AdamW
steps with weight decay; HF -> Megatron (TP=2) -> HF is bit-identical; checkpoints written at TP=2 (offline
conversion and save_model_checkpoint) load at TP=1, TP=3 and TP=2 x PP=3 with the same logits.

ONE spawn of 6 gloo ranks runs every layout and case.
"""

from __future__ import annotations

import functools
import glob
import os
import tempfile
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_model_parallel_equivalence import (
    B,
    T,
    _run_layout,
    full_logits,
    grads_tol,
    hf_reference,
    inputs_and_weights,
    logits_tol,
    rel_err,
)

# (2, 1) first: its saved (padded) checkpoint is then loaded by every later layout.
LAYOUTS = [(2, 1), (1, 1), (3, 1), (2, 3)]
CASES = ("qwen3", "llama")
ADAM_STEPS = 3


def tiny_arch(case: str):
    from egrsd_megatron.models import ModelArch

    return ModelArch(
        num_layers=3,
        hidden_size=96,
        num_attention_heads=6,
        num_kv_heads=3,
        head_dim=16,
        ffn_hidden_size=96,
        vocab_size=200,
        qk_norm=case == "qwen3",
        family=case,
        tie_word_embeddings=case == "llama",
    )


def save_tiny_hf(case: str, out_dir: str, seed: int) -> str:
    """A random transformers model of tiny_arch(case) (norm weights randomised too), saved as safetensors."""
    from egrsd_megatron.testing.tiny import save_random_hf_model

    return save_random_hf_model(tiny_arch(case), out_dir, seed, randomize_norms=True)


def _padding_absmax(model, arch, grads: bool = False) -> float:
    """Largest |x| over this rank's padding groups (weights or grads); 0.0 when there is no padding."""
    from megatron.core import parallel_state as ps

    from egrsd_megatron.models.group_padding import padding_params, padding_view

    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    m = 0.0
    for _, kind, p in padding_params(model):
        t = p.grad if grads else p.data
        if t is not None:
            v = padding_view(kind, t, arch, tp, tpr)
            m = max(m, float(v.abs().max()) if v.numel() else 0.0)
    return m


def _n_padding(model, arch) -> int:
    from megatron.core import parallel_state as ps

    from egrsd_megatron.models.group_padding import padding_params, padding_view

    tp, tpr = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return sum(padding_view(k, p.data, arch, tp, tpr).numel() for _, k, p in padding_params(model))


def worker(rank: int, world: int, hf_dirs: Dict[str, str], offline: Dict[str, str], save_root: str):
    from megatron.core import parallel_state as ps

    from egrsd_megatron.checkpoint.megatron_format import load_model_checkpoint, save_model_checkpoint
    from egrsd_megatron.checkpoint.reshard import gather_hf_state_dict, load_hf_weights
    from egrsd_megatron.config.schema import ModelConfig
    from egrsd_megatron.distributed.runtime import init_distributed
    from egrsd_megatron.models import build_model

    out = {}
    for tp, pp in LAYOUTS:
        info = init_distributed(tp=tp, pp=pp, seed=1234)
        for case, hf_dir in hf_dirs.items():
            arch = tiny_arch(case)
            ref = load_file(os.path.join(hf_dir, "model.safetensors"))
            model = build_model(arch, ModelConfig())
            r = {
                "tp_rank": info.tp_rank,
                "pp_rank": info.pp_rank,
                "dp_rank": info.dp_rank,
                "n_padding": _n_padding(model, arch),
                "init_pad": _padding_absmax(model, arch),
            }
            load_hf_weights(model, arch, hf_dir)
            r["loaded_pad"] = _padding_absmax(model, arch)
            ids, w = inputs_and_weights(arch, arch.padded_vocab_size(tp))
            r["logits"] = _run_layout(model, arch, ids, w)
            r["grad_pad"] = _padding_absmax(model, arch, grads=True)
            grads = {n: t.clone() for n, t in gather_hf_state_dict(model, arch, grads=True)}
            values = dict(gather_hf_state_dict(model, arch))
            r["values_mismatch"] = sorted(n for n in ref if n not in values or not torch.equal(values[n], ref[n]))
            if rank == 0:
                r["grads"] = grads
            if (tp, pp) == (2, 1):
                save_model_checkpoint(model, arch, os.path.join(save_root, case), tokenizer_src=hf_dir)
            # Checkpoints written at TP=2 (padded) load here: logits bit-identical to the direct HF load. The
            # offline conversion is loaded at the layouts other than its own (same layout: plain load_state_dict).
            srcs = [("saved", os.path.join(save_root, case))] + ([("offline", offline[case])] if tp != 2 else [])
            for name, ckpt in srcs:
                m2 = build_model(arch, ModelConfig())
                load_model_checkpoint(m2, arch, ckpt)
                l2 = _run_layout(m2, arch, ids, w)
                # Bitwise: same layout, process and thread count as r["logits"], and the loaded weights are
                # bit-identical (values_mismatch), so the same kernels run on the same bits in the same order.
                r[f"load_{name}_equal"] = torch.equal(l2, r["logits"]) if ps.is_pipeline_last_stage() else l2 is None
                r[f"load_{name}_pad"] = _padding_absmax(m2, arch)
            # AdamW with weight decay on the Megatron shards: the padding stays exactly zero, the rest moves.
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            for _ in range(ADAM_STEPS):
                opt.zero_grad()
                _run_layout(model, arch, ids, w)
                opt.step()
            r["adam_pad"] = _padding_absmax(model, arch)
            # (all-zero shards, e.g. a TP rank holding only vocabulary padding rows, legitimately stay put)
            r["adam_moved"] = all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if before[n].any())
            r["adam_gather_ok"] = len(dict(gather_hf_state_dict(model, arch))) == len(ref)  # raises if padding != 0
            out[f"{case}/tp{tp}pp{pp}"] = r
    return out


@functools.lru_cache(maxsize=1)
def results():
    from egrsd_megatron.checkpoint.convert import hf_to_megatron
    from egrsd_megatron.testing.spawn import run_distributed

    root = tempfile.mkdtemp(prefix="egrsd_gpad_")
    hf_dirs = {c: save_tiny_hf(c, os.path.join(root, c), seed=i) for i, c in enumerate(CASES)}
    offline = {c: hf_to_megatron(d, os.path.join(root, f"off_{c}"), tp=2) for c, d in hf_dirs.items()}
    save_root = os.path.join(root, "saved")
    os.makedirs(save_root)
    res = run_distributed(worker, 6, hf_dirs, offline, save_root, timeout=600)
    refs = {c: hf_reference(d) for c, d in hf_dirs.items()}
    return root, hf_dirs, res, refs


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_padded_tp_matches_transformers_and_tp1(case):
    _, _, res, refs = results()
    arch = tiny_arch(case)
    hf_logits, hf_grads = refs[case]
    base = full_logits(res, f"{case}/tp1pp1", arch.vocab_size)
    # tiny_arch: 3453 (llama 3405) forward roundings -> logits_tol 1.1e-5, grads_tol 1.6e-5 (4 sigma).
    # The padded group's zero rows add exact zeros to each sum (no rounding), so padding adds no terms.
    l_tol, g_tol = logits_tol(arch), grads_tol(arch)
    assert rel_err(base, hf_logits.numpy()) <= l_tol
    for tp, pp in LAYOUTS:
        key = f"{case}/tp{tp}pp{pp}"
        got = full_logits(res, key, arch.vocab_size)
        assert got.shape == (B, T, arch.vocab_size)
        assert rel_err(got, base) <= l_tol, key
        assert rel_err(got, hf_logits.numpy()) <= l_tol, key
        grads = res[0][key]["grads"]
        assert set(grads) == set(hf_grads), key
        worst = max(
            max(rel_err(grads[n], res[0][f"{case}/tp1pp1"]["grads"][n]), rel_err(grads[n], g.numpy()))
            for n, g in hf_grads.items()
        )
        print(
            f"{key}: logits rel err {max(rel_err(got, base), rel_err(got, hf_logits.numpy())):.2g} / {l_tol:.2g}, "
            f"grads {worst:.2g} / {g_tol:.2g}"
        )
        for n, g in hf_grads.items():
            assert rel_err(grads[n], g.numpy()) <= g_tol, (key, n)
            assert rel_err(grads[n], res[0][f"{case}/tp1pp1"]["grads"][n]) <= g_tol, (key, n)


@pytest.mark.slow
def test_padding_is_exactly_zero_and_stays_zero():
    _, _, res, _ = results()
    padded_ranks = 0
    for r in res:
        for key, v in r.items():
            tp = int(key.split("/tp")[1].split("pp")[0])
            # TP=2: rank 1 holds global group 3 = padding (its q/k/v rows and linear_proj columns); else none.
            expect = tp == 2 and v["tp_rank"] == 1
            assert (v["n_padding"] > 0) == expect, key
            padded_ranks += expect
            for k in ("init_pad", "loaded_pad", "grad_pad", "load_offline_pad", "load_saved_pad", "adam_pad"):
                assert v.get(k, 0.0) == 0.0, (key, k, v[k])
            assert v["adam_moved"] and v["adam_gather_ok"], key
    assert padded_ranks == 2 * (3 + 3)  # 2 cases x (TP2 x DP3: 3 ranks + TP2 x PP3: 3 ranks)


@pytest.mark.slow
def test_roundtrip_and_tp2_checkpoints_load_everywhere(tmp_path):
    from egrsd_megatron.checkpoint.convert import megatron_to_hf
    from egrsd_megatron.checkpoint.megatron_format import read_checkpoint_metadata

    root, hf_dirs, res, _ = results()
    for r in res:
        for key, v in r.items():
            tp = int(key.split("/tp")[1].split("pp")[0])
            assert v["values_mismatch"] == [], key
            assert ("load_offline_equal" in v) == (tp != 2), key
            assert v.get("load_offline_equal", True) is True and v["load_saved_equal"] is True, key
    for case, hf_dir in hf_dirs.items():
        ref = load_file(os.path.join(hf_dir, "model.safetensors"))
        for name, ck in (("offline", os.path.join(root, f"off_{case}")), ("saved", os.path.join(root, "saved", case))):
            meta = read_checkpoint_metadata(ck)
            assert (
                meta["tp"],
                meta["megatron_query_groups"],
                meta["megatron_attention_heads"],
                meta["padded_kv_groups"],
            ) == (2, 4, 8, 1)
            a = meta["megatron_lm_args"]
            assert a[a.index("--num-query-groups") + 1] == "4" and a[a.index("--num-attention-heads") + 1] == "8"
            out = megatron_to_hf(ck, str(tmp_path / f"{case}_{name}"))
            got = {}
            for f in glob.glob(os.path.join(out, "*.safetensors")):
                got.update(load_file(f))
            assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), (case, name)
