"""Distributed runtime: launcher environments, layout checks, and the spawn harness's failure modes."""

from __future__ import annotations

import time

import pytest

from egrsd_megatron.distributed.runtime import check_layout, launcher_env, world_size
from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.spawn import DistributedChildError


def test_torchrun_env_wins(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    env = launcher_env()
    assert (env["rank"], env["world_size"], env["local_rank"], env["master_addr"]) == (3, 8, 1, "10.0.0.1")


def test_slurm_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],cpu01")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the runtime parses the node list itself
    env = launcher_env()
    assert (env["rank"], env["world_size"], env["local_rank"]) == (5, 16, 1)
    assert env["master_addr"] == "gpu07"
    assert env["master_port"] == str(20000 + 12345 % 20000)


def test_world_size_from_the_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert world_size() == 1
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("MASTER_ADDR", "node1")  # no scontrol lookup of the node list
    assert world_size() == 8 == launcher_env()["world_size"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun wins over Slurm (torchrun inside an allocation)
    assert world_size() == 4 == launcher_env()["world_size"]


def test_layout_error_names_the_numbers():
    assert check_layout(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.tp=4 x parallel.pp=1"):
        check_layout(6, 4, 1)


def _ranks(rank, world):
    import torch
    import torch.distributed as dist

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t}


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise KeyError("deliberate failure in the child")
    return rank


def _hangs(rank, world):
    time.sleep(600)


def test_spawn_harness_results_errors_and_timeouts():
    res = run_distributed(_ranks, 2, timeout=120)
    assert [r["rank"] for r in res] == [0, 1] and all(float(r["sum"][0]) == 3.0 for r in res)
    with pytest.raises(DistributedChildError, match=r"(?s)rank 1 of 2 failed.*_fails_on_rank_1.*deliberate failure"):
        run_distributed(_fails_on_rank_1, 2, timeout=120)
    # The timeout counts from the start: ranks still importing torch when it expires (a loaded machine) have
    # not finished either, so a short one tests the same path; the kill must follow it promptly.
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"did not finish within 6 s"):
        run_distributed(_hangs, 2, timeout=6)
    assert time.monotonic() - t0 < 40


def test_megatron_version_check(monkeypatch):
    from importlib import metadata

    from egrsd_megatron.compat import megatron_version

    assert megatron_version.check_megatron_core_version() >= megatron_version._MIN
    monkeypatch.setattr(metadata, "version", lambda name: "0.12.0")
    with pytest.raises(ImportError, match=r"megatron-core 0.12.0 is installed; egrsd-megatron supports"):
        megatron_version.check_megatron_core_version()
