"""egrsd_megatron.testing.numerics: thread count and deterministic mode from the environment."""

import os

import pytest
import torch

from egrsd_megatron.testing import run_distributed
from egrsd_megatron.testing.numerics import deterministic_requested, thread_count


def test_thread_count_honours_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_count(2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_count(2) == max(1, (os.cpu_count() or 1) // 2)
    assert thread_count(10**6) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        thread_count(1)


def test_deterministic_flag(monkeypatch):
    monkeypatch.setenv("EGRSD_DETERMINISTIC", "1")
    assert deterministic_requested()
    monkeypatch.setenv("EGRSD_DETERMINISTIC", "0")
    assert not deterministic_requested()


def _rank_settings(rank, world_size):
    return torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()


def test_spawned_ranks_take_the_settings():
    got = run_distributed(_rank_settings, 2, env={"OMP_NUM_THREADS": "1", "EGRSD_DETERMINISTIC": "1"})
    assert got == [(1, True), (1, True)]
