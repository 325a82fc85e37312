"""Everything that differs between environments: megatron-core versions and the CPU backend."""

from .cpu_backend import apply_cpu_backend
from .megatron_version import MEGATRON_CORE_SUPPORTED, check_megatron_core_version

__all__ = ["MEGATRON_CORE_SUPPORTED", "check_megatron_core_version", "apply_cpu_backend"]
