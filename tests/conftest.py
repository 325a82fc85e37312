import os

import pytest

from egrsd_megatron.testing.numerics import apply_deterministic

# Nothing may be downloaded from a model hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _numerics():
    """EGRSD_DETERMINISTIC=1 puts the pytest process in torch's deterministic mode, as spawned ranks are
    (egrsd_megatron/testing/numerics.py); its thread count torch itself takes from OMP_NUM_THREADS."""
    apply_deterministic()
    yield


# The launcher variables the code reads (distributed/runtime.py) and sets (rollout/vllm_engine.py): a test
# that leaves one behind changes what every later test's subprocess sees (e.g. WORLD_SIZE=6 made a training
# run in a later test refuse its layout), depending on test order.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(autouse=True)
def _no_leaked_launcher_env():
    before = {k: os.environ.get(k) for k in _LAUNCHER_VARS}
    yield
    leaked = {k: os.environ.get(k) for k in _LAUNCHER_VARS if os.environ.get(k) != before[k]}
    for k, v in before.items():  # restored either way, so one leak fails one test, not the ones after it
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"the test left launcher variables changed: {leaked} (use monkeypatch)"
