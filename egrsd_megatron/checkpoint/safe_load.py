"""Reading `.pt` files without running code from them: `torch.load(weights_only=True)` and an allowlist.

A pickle may name any importable callable (`os.system`, a class whose `__reduce__` does anything), and
`torch.load` without weights_only calls it: a shared checkpoint could run arbitrary code. With
`weights_only=True` torch's unpickler builds only tensors, storages, dtypes, torch.Size, containers
(dict, list, tuple, set, OrderedDict) and primitive types, plus the globals allowlisted here.

Everything this project writes into a `.pt` file is built from those types on purpose (the RNG states
are stored as tensors and plain ints, not numpy objects: `train_state._rng_state`), so the allowlist
`SAFE_GLOBALS` is empty: nothing beyond torch's defaults is trusted. A future entry must be a class
whose construction runs no user code (e.g. a dataclass of numbers), with the reason beside it.
Every `.pt` read of the project goes through `load_pt`.
"""

from __future__ import annotations

import pickle
from typing import Any, Tuple

import torch

from ..utils.errors import InputError

__all__ = ["SAFE_GLOBALS", "UnsafeCheckpointError", "load_pt"]

# Globals the checkpoints need beyond torch's weights_only defaults (see the module docstring): none.
SAFE_GLOBALS: Tuple[Any, ...] = ()


class UnsafeCheckpointError(InputError):
    """A `.pt` file holds a pickled object outside the allowlist; it was refused (nothing in it ran)."""


def _refusal_reason(err: BaseException) -> str:
    """The line of torch's (long) weights_only message that names the refused global."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "Unsupported global" in ln or "Unsupported operand" in ln or "GLOBAL" in ln:
            return ln
    return lines[-1] if lines else type(err).__name__


def load_pt(path: str, what: str, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; errors name the file, what it should hold and why.

    A foreign pickled object raises UnsafeCheckpointError (nothing was executed); any other unreadable
    file (truncated, not a torch file) raises InputError instead of a traceback from inside torch.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeCheckpointError(
                f"{path}: refused to load {what}: it holds a pickled object that is not a tensor, number, string "
                f"or container ({_refusal_reason(e)}). egrsd never writes such objects; this file was not "
                f"written by egrsd or was altered. Loading it would run code from the file: delete it, or "
                f"resume from another checkpoint"
            ) from None
        raise InputError(f"{path}: cannot be read as {what} (damaged pickle: {e})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic, ...: re-raised naming the file
        raise InputError(
            f"{path}: cannot be read as {what} ({type(e).__name__}: {e}); the file is damaged or is "
            f"not a torch checkpoint file"
        ) from None
