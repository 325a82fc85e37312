"""checkpoint/safe_load.py and checkpoint/manifest.py: a foreign pickled object is refused without running
it (in a `.pt` file and in torch_dist's `.metadata`); every kind of damage to a checkpoint file (delete,
truncate, flip a byte, append) is named."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from egrsd_megatron.checkpoint.manifest import MANIFEST_FILE, verify_manifest, write_manifest
from egrsd_megatron.checkpoint.safe_load import DCP_METADATA_GLOBALS, UnsafeCheckpointError, load_dcp_metadata, load_pt
from egrsd_megatron.utils.errors import InputError


class Payload:
    """A foreign object: unpickling it would call os.system (creating the marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    def __init__(self) -> None:
        self.x = 1


def test_plain_state_loads(tmp_path):
    f = str(tmp_path / "ok.pt")
    obj = {
        "state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(2.0)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}],
        "python": (3, (1, 2), None),
    }
    torch.save(obj, f)
    got = load_pt(f, "optimizer state")
    assert torch.equal(got["state"][0]["exp_avg"], torch.ones(3)) and got["param_groups"][0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("kind", ["os_system", "custom_class"])
def test_foreign_object_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    f = str(tmp_path / "optim.pt")
    bad = Payload(str(marker)) if kind == "os_system" else Custom()
    torch.save({"optimizer": {"state": {}}, "extra": bad}, f)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pt(f, "optimizer and scheduler state")
    msg = str(e.value)
    assert f in msg and "refused to load optimizer and scheduler state" in msg, msg
    assert ("system" in msg) if kind == "os_system" else ("Custom" in msg), msg
    assert "Traceback" not in msg and len(msg) < 800, msg  # one clear line, not torch's page of advice
    assert not marker.exists()


def test_unreadable_file_names_it(tmp_path):
    f = tmp_path / "rng.pt"
    torch.save({"torch": torch.get_rng_state()}, str(f))
    f.write_bytes(f.read_bytes()[:100])  # truncated
    with pytest.raises(InputError, match=rf"{f}: cannot be read as RNG state"):
        load_pt(str(f), "RNG state")


def _folder(root):
    os.makedirs(root / "optim")
    torch.save({"w": torch.arange(1000.0)}, str(root / "optim" / "mp_rank_00.pt"))
    (root / "trainer_state.json").write_text(json.dumps({"step": 3}))
    write_manifest(str(root))
    return root


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


DAMAGE = {
    "delete": lambda p: p.unlink(),
    "truncate": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "flip": _flip,
    "append": lambda p: p.write_bytes(p.read_bytes() + b"x"),
}
EXPECT = {
    "delete": "is missing",
    "truncate": "bytes, the manifest says",
    "flip": "does not match its SHA-256",
    "append": "bytes, the manifest says",
}


def test_intact_folder_verifies(tmp_path):
    root = _folder(tmp_path / "ck")
    m = json.loads((root / MANIFEST_FILE).read_text())
    assert sorted(m["files"]) == ["optim/mp_rank_00.pt", "trainer_state.json"]
    assert verify_manifest(str(root)) == []


@pytest.mark.parametrize("rel", ["optim/mp_rank_00.pt", "trainer_state.json"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_each_damage_is_named(tmp_path, rel, how):
    root = _folder(tmp_path / "ck")
    DAMAGE[how](root / rel)
    problems = verify_manifest(str(root))
    assert len(problems) == 1 and str(root / rel) in problems[0] and EXPECT[how] in problems[0], problems


@pytest.mark.parametrize("how", ["delete", "truncate", "flip"])
def test_damaged_or_missing_manifest_is_named(tmp_path, how):
    root = _folder(tmp_path / "ck")
    DAMAGE[how](root / MANIFEST_FILE)
    problems = verify_manifest(str(root))
    assert len(problems) == 1 and str(root / MANIFEST_FILE) in problems[0], problems
    if how == "flip":  # a flipped byte in JSON either breaks it or alters an entry: named either way
        assert "damaged" in problems[0] or "does not match" in problems[0] or "bytes" in problems[0], problems


# ------------------------------------------------------------ torch_dist: torch.distributed.checkpoint's .metadata
def _dcp_folder(root):
    """A torch.distributed.checkpoint folder written in one process (what each torch_dist rank writes)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(
        {"w": torch.arange(12.0).view(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
        checkpoint_id=str(root),
        no_dist=True,
    )
    return root


class _Recorder(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self.names = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


def test_dcp_metadata_loads_and_allowlist_covers_it(tmp_path):
    root = _dcp_folder(tmp_path / "dcp")
    md = load_dcp_metadata(str(root / ".metadata"))
    assert sorted(md.state_dict_metadata) == ["b", "w"] and tuple(md.state_dict_metadata["w"].size) == (3, 4)
    with open(root / ".metadata", "rb") as f:
        rec = _Recorder(f)
        rec.load()
    assert rec.names <= DCP_METADATA_GLOBALS, rec.names - DCP_METADATA_GLOBALS


@pytest.mark.parametrize("kind", ["os_system", "custom_class"])
def test_dcp_metadata_with_a_foreign_object_is_refused_and_never_runs(tmp_path, kind):
    from egrsd_megatron.checkpoint.dist_format import stored_tensors

    root = _dcp_folder(tmp_path / "dcp")
    marker = tmp_path / "pwned"
    md = load_dcp_metadata(str(root / ".metadata"))
    md.planner_data = Payload(str(marker)) if kind == "os_system" else Custom()
    with open(root / ".metadata", "wb") as f:
        pickle.dump(md, f)
    for load in (lambda: load_dcp_metadata(str(root / ".metadata")), lambda: stored_tensors(str(root))):
        with pytest.raises(UnsafeCheckpointError) as e:
            load()
        msg = str(e.value)
        assert str(root / ".metadata") in msg and "refused to load torch_dist checkpoint metadata" in msg, msg
        assert ("system" in msg) if kind == "os_system" else ("Custom" in msg), msg
        assert not marker.exists()


def test_damaged_dcp_metadata_is_named(tmp_path):
    root = _dcp_folder(tmp_path / "dcp")
    p = root / ".metadata"
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(InputError, match=r"cannot be read as torch_dist checkpoint metadata"):
        load_dcp_metadata(str(p))
