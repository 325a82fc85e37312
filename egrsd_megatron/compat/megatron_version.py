"""The megatron-core versions this project runs on, checked once at import of the model code.

0.16.1 is the newest release installable on Python 3.11 (CPU development machines); GPU clusters run
newer releases inside NVIDIA containers. Version differences are isolated here and in cpu_backend.py.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

MEGATRON_CORE_SUPPORTED = (">=0.16.1", "<0.20")
_MIN, _MAX = Version("0.16.1"), Version("0.20")


def megatron_core_version() -> Version:
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError as e:
        raise ImportError("megatron-core is not installed: run `make setup` (it installs megatron-core>=0.16.1)") from e


def check_megatron_core_version() -> Version:
    """Raise ImportError outside the supported range, naming the installed and the supported versions."""
    v = megatron_core_version()
    if not (_MIN <= v < _MAX):
        raise ImportError(
            f"megatron-core {v} is installed; egrsd-megatron supports megatron-core "
            f"{' '.join(MEGATRON_CORE_SUPPORTED)} (tested with 0.16.1)"
        )
    return v
