"""rollout.* keys of the cluster rollout path: vllm_tp, vllm_sleep, vllm_sleep_level, hf_dtype / vllm_dtype.
(What only the machine can decide, sleep mode on vLLM's CPU backend, is refused by the engine at start-up:
tests/unit/test_vllm_engine_fake.py.)"""

from __future__ import annotations

import pytest

from egrsd_megatron.config import ConfigError, load_config


@pytest.mark.parametrize(
    "overrides, match",
    [
        # vLLM's TP groups are blocks of consecutive ranks: one must fit inside a trainer TP group.
        (
            ["rollout.engine=vllm", "parallel.tp=2", "rollout.vllm_tp=4"],
            r"'rollout.vllm_tp': 4 must divide parallel.tp=2",
        ),
        (
            ["rollout.engine=vllm", "parallel.tp=4", "rollout.vllm_tp=3"],
            r"'rollout.vllm_tp': 3 must divide parallel.tp=4",
        ),
        (["rollout.vllm_tp=0"], r"'rollout.vllm_tp': must be >= 1, got 0"),
        (["rollout.vllm_sleep_level=3"], r"'rollout.vllm_sleep_level': got 3; expected 1 or 2"),
        (["rollout.hf_dtype=fp16"], r"'rollout.hf_dtype': got 'fp16'; expected one of bfloat16, float16, float32"),
        (["rollout.vllm_dtype=half"], r"'rollout.vllm_dtype': got 'half'"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("base", overrides)


def test_good_values_load():
    ro = load_config(
        "base",
        [
            "rollout.engine=vllm",
            "parallel.tp=4",
            "rollout.vllm_tp=2",
            "rollout.vllm_sleep=true",
            "rollout.vllm_sleep_level=2",
        ],
    ).rollout
    assert (ro.vllm_tp, ro.vllm_sleep, ro.vllm_sleep_level, ro.hf_dtype) == (2, True, 2, None)
    # The vllm_* keys are unused by the hf engine, so a cluster config switches engines with one override.
    ro = load_config("qwen3_8b", ["rollout.engine=hf"]).rollout
    assert ro.engine == "hf" and ro.vllm_sleep is True
