"""checkpoint/formats.py: load/save/source dispatched on egrsd_checkpoint.json's `format`; the TensorSource
protocol that resharding reads from."""

from __future__ import annotations

import json
import os

import pytest
import torch

from egrsd_megatron.checkpoint import formats
from egrsd_megatron.checkpoint.convert import hf_to_megatron
from egrsd_megatron.checkpoint.hf_io import HFSource
from egrsd_megatron.checkpoint.layout import emitters
from egrsd_megatron.checkpoint.megatron_format import FORMAT, MegatronSource
from egrsd_megatron.checkpoint.metadata import META_FILE
from egrsd_megatron.checkpoint.source import TensorSource
from egrsd_megatron.utils.errors import InputError
from tests.distributed.test_model_parallel_equivalence import make_hf_checkpoint


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    hf = make_hf_checkpoint("qwen3_tied", str(root / "hf"), seed=0)
    return hf, hf_to_megatron(hf, str(root / "meg"), tp=2, pp=1)


def test_sources_satisfy_the_protocol(meg):
    hf, ck = meg
    assert isinstance(HFSource(hf), TensorSource)
    src = formats.open_source(ck)
    assert isinstance(src, MegatronSource) and isinstance(src, TensorSource)
    # The same full tensors from both sources (the Megatron ones rebuilt from their two TP shards).
    for pm in emitters(src.arch):
        assert all(torch.equal(a, b) for a, b in zip(src.fetch(pm.hf_names), HFSource(hf).fetch(pm.hf_names)))
    src.close()


def test_dispatch_on_the_format_field(meg, tmp_path, monkeypatch):
    _, ck = meg
    assert formats.format_of(ck).name == FORMAT == formats.DEFAULT_FORMAT
    calls = []
    fake = formats.CheckpointFormat(
        "toy-v1",
        save=lambda *a, **k: calls.append(("save", a, k)) or "x",
        load=lambda *a: calls.append(("load", a)),
        source=lambda d, arch=None: "src",
    )
    monkeypatch.setitem(formats.FORMATS, "toy-v1", fake)
    other = tmp_path / "toy"
    other.mkdir()
    (other / META_FILE).write_text(json.dumps({"format": "toy-v1"}))
    formats.load_checkpoint("model", "arch", str(other))
    assert calls == [("load", ("model", "arch", str(other)))]
    assert formats.open_source(str(other)) == "src"
    formats.save_checkpoint("model", "arch", "out", fmt="toy-v1")
    assert calls[-1][0] == "save"


def test_unknown_format_names_the_known_ones(tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"format": "zarr-v9"}))
    known = ", ".join(sorted(formats.FORMATS))  # the per-rank torch layout and Megatron-Core's torch_dist
    assert FORMAT in known and "megatron-core-torch-dist" in known
    with pytest.raises(InputError, match=rf"format 'zarr-v9' is not a known checkpoint format \(known: {known}\)"):
        formats.load_checkpoint(None, None, str(tmp_path))
    with pytest.raises(InputError, match="checkpoint format 'zarr-v9' is not known"):
        formats.save_checkpoint(None, None, str(tmp_path / "o"), fmt="zarr-v9")


def test_ckpt_format_is_validated_and_the_cluster_configs_use_torch_dist():
    from egrsd_megatron.config import ConfigError, load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(ConfigError, match="train.ckpt_format.*torch, torch_dist"):
        load_config(None, ["train.ckpt_format=zarr"])
    assert load_config(os.path.join(root, "conf", "tiny_cpu.yaml"), []).train.ckpt_format == "torch"
    for name in ("qwen3_8b.yaml", "qwen3_4b.yaml"):
        assert load_config(os.path.join(root, "conf", name), []).train.ckpt_format == "torch_dist", name


def test_torch_dist_refuses_to_reshard_padded_attention_groups():
    """Zero KV groups added at the written TP change the attention tensors' global shapes: named, not read."""
    from egrsd_megatron.checkpoint.dist_format import check_reshardable
    from egrsd_megatron.models import PRESETS

    arch = PRESETS["qwen3_tiny"]  # 2 KV heads: no padding at TP 1 or 2
    check_reshardable({"tp": 2, "megatron_query_groups": arch.megatron_groups(2)}, arch, 1, "ck")
    with pytest.raises(InputError, match=r"ck: written at TP=4 with 4 query groups .* cannot reshard"):
        check_reshardable({"tp": 4, "megatron_query_groups": 4, "padded_kv_groups": 2}, arch, 2, "ck")
