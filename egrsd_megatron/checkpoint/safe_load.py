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

torch_dist checkpoints (dist_format.py) add one more pickle: torch.distributed.checkpoint's `.metadata`,
which torch unpickles with plain `pickle.load`. `load_dcp_metadata` reads it with an unpickler that
resolves only `DCP_METADATA_GLOBALS`: the metadata and save-plan dataclasses of torch.distributed.checkpoint
and the torch types their fields hold: the list is what unpickling the files Megatron-Core 0.16.1 and
torch 2.13 write asks for (recorded; tests/unit/test_checkpoint_safety.py checks that a file torch writes
needs nothing else, tests/distributed/test_torch_dist_ckpt.py loads Megatron's). Constructing any of them
runs no user code (dataclass fields, an Enum lookup, torch.Size of ints, torch's layout-table lookup, a
pathlib path).
"""

from __future__ import annotations

import io
import pickle
from typing import Any, FrozenSet, Tuple

import torch

from ..utils.errors import InputError

__all__ = ["DCP_METADATA_GLOBALS", "SAFE_GLOBALS", "UnsafeCheckpointError", "load_dcp_metadata", "load_pt"]

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


_DCP = "torch.distributed.checkpoint.metadata"
# (module, name) a torch.distributed.checkpoint `.metadata` file may name (module docstring).
DCP_METADATA_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "TensorProperties"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        # Metadata.all_local_plans: every rank's save plan (torch 2.13 keeps them in the metadata).
        ("torch.distributed.checkpoint.planner", "SavePlan"),
        ("torch.distributed.checkpoint.planner", "WriteItem"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch.distributed.checkpoint.planner", "TensorWriteData"),
        ("torch", "Size"),
        # StorageMeta.checkpoint_id as torch's own FileSystemWriter records it (a path object: no I/O on creation).
        ("pathlib", "PosixPath"),
        # torch pickles a torch.layout as _get_layout("torch.strided"): a lookup in a table of torch's layouts.
        ("torch.serialization", "_get_layout"),
        *(("torch", d) for d in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool")),
    }
)


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in DCP_METADATA_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load torch_dist checkpoint metadata: it names {module}.{name}, which "
                f"is not one of torch.distributed.checkpoint's metadata types. egrsd and Megatron-Core never "
                f"write such objects; the file was altered or not written by them. Unpickling it would run "
                f"code from the file: delete the checkpoint, or resume from another one"
            )
        return super().find_class(module, name)


def load_dcp_metadata(path: str) -> Any:
    """A torch.distributed.checkpoint `.metadata` file, unpickled through DCP_METADATA_GLOBALS only.

    A foreign global raises UnsafeCheckpointError naming it (before anything is constructed); a
    truncated or non-pickle file raises InputError naming the file.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _DCPMetadataUnpickler(io.BytesIO(data), path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle: named, not a traceback from pickle
        raise InputError(
            f"{path}: cannot be read as torch_dist checkpoint metadata ({type(e).__name__}: {e}); the file is damaged"
        ) from None
