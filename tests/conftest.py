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
