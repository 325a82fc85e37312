"""Redirects that let Megatron-Core (CUDA-first) run on CPU over gloo. Applied only when CUDA is absent.

Each redirect is the smallest change that makes one CUDA assumption hold on CPU; on a GPU machine
`apply_cpu_backend()` does nothing. Checked with megatron-core 0.16.1: TP=2, PP=2 and TP2xPP2
forward/backward match TP=1 and Hugging Face transformers (tests/distributed/test_model_parallel_equivalence.py).

1. `torch.cuda.current_device()` is used as the device of buffers (rotary embeddings, TP mappings,
   layer weights): it returns the CPU device.
2. The model-parallel RNG tracker saves/forks CUDA generator states: `torch.cuda.get_rng_state`,
   `set_rng_state`, `manual_seed` and Megatron's `_get_cuda_rng_state` / `_set_cuda_rng_state` map to
   the CPU generator (forks stay deterministic per TP rank, as on GPU).
3. Pipeline p2p communication calls `torch.cuda.synchronize()`: a no-op on CPU (gloo is synchronous).
4. Some modules create tensors with a hard-coded `device="cuda"` (pipeline schedules, optimizer,
   clip_grads, param_and_grad_buffer, transformer.utils causal masks, utils l2 norm, rerun state
   machine, tensor_parallel.data): their module-global `torch` is replaced by a proxy that rewrites
   that device to "cpu"; everything else passes through to torch untouched.
5. `Tensor.cuda()` (tied-embedding init with PP, optimizer state loading) returns the tensor itself.
"""

from __future__ import annotations

import importlib
import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)
_APPLIED = False

# Modules with hard-coded device="cuda" factory calls (redirect 4).
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuTorch(types.ModuleType):
    """`torch` as seen by a module with hard-coded CUDA factory calls: device='cuda' becomes 'cpu'."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if callable(attr) and not isinstance(attr, type) and not isinstance(attr, types.ModuleType):

            def call(*args, _f=attr, **kwargs):
                if _is_cuda(kwargs.get("device")):
                    kwargs["device"] = "cpu"
                    kwargs.pop("pin_memory", None)
                return _f(*args, **kwargs)

            return call
        return attr


def apply_cpu_backend(force: bool = False) -> bool:
    """Install the redirects once per process when CUDA is unavailable. Returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from .megatron_version import check_megatron_core_version

    check_megatron_core_version()

    cpu = torch.device("cpu")
    # 1. buffers placed on "the current CUDA device"
    torch.cuda.current_device = lambda: cpu  # type: ignore[assignment]
    # 2. RNG state of "the CUDA generator" is the CPU generator's
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)  # type: ignore[assignment]
    # The CPU generator alone (torch.manual_seed itself calls torch.cuda.manual_seed_all: leave that one).
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state  # type: ignore[assignment]
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    rnd._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (  # type: ignore[attr-defined]
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    rnd._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)  # type: ignore[attr-defined]
    # 3. stream synchronisation around p2p sends
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # 4. hard-coded device="cuda" factories
    proxy = _CpuTorch()
    for name in _CUDA_FACTORY_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy  # type: ignore[attr-defined]
    # 5. explicit .cuda() moves
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    _APPLIED = True
    log.warning(
        "egrsd: CUDA unavailable; Megatron-Core CPU backend active (5 redirects, see "
        "egrsd_megatron/compat/cpu_backend.py)"
    )
    return True
