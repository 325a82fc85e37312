"""`manifest.json`: the list of a checkpoint folder's files with their sizes and SHA-256 digests.

Written LAST into a training checkpoint (after every rank's files, before the folder is renamed into
place and `latest` moves), so a folder with a valid manifest whose files all match is complete and
undamaged; anything else (a missing, truncated, extra-byte or bit-flipped file, a missing or unreadable
manifest) is reported by name before any file is unpickled.

Both writing and checking are collective and split the files over the ranks (file i is hashed by rank
i mod world), so each rank reads ~1/world of the bytes. Cost: hashlib's SHA-256 runs at ~0.5-2 GB/s per
core. An 8B model with AdamW and fp32 masters is ~8e9 x (2 + 4 + 8) B = 112 GB of checkpoint: over 64
ranks ~1.8 GB each, ~1-4 s of hashing, but the shared filesystem's aggregate read bandwidth then bounds
it (~10-20 s at 5-10 GB/s; on save the files were just written and are usually still in page cache).
An asynchronous save (train.async_save) has its writer process hash the sharded files right after writing
them, in the background (`write_manifest(known=...)`, checkpoint/async_save.py); the finalize hashes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import torch.distributed as dist

from ..utils.atomic import atomic_write_json

__all__ = ["MANIFEST_FILE", "file_digest", "file_entry", "verify_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 * 1024**2


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in 8 MiB chunks (hashlib releases the GIL on large updates)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str) -> Dict[str, object]:
    """A manifest entry: the file's size and SHA-256."""
    return {"size": os.path.getsize(path), "sha256": file_digest(path)}


def _rank_world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _list_files(root: str) -> List[str]:
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != MANIFEST_FILE:
                files.append(rel)
    return sorted(files)


def write_manifest(root: str, known: Optional[Dict[str, Dict[str, object]]] = None) -> Dict[str, Dict[str, object]]:
    """Collective: hash every file under `root` (split over the ranks); rank 0 writes root/manifest.json.

    Call after every rank finished writing its files (a barrier) and before the folder becomes visible.
    `known`: entries (file_entry) this rank already has for files it wrote, keyed by path relative to `root`
    (an asynchronous save's writer hashes its files right after writing them: checkpoint/async_save.py); the
    files known on any rank are not read again.
    """
    rank, world = _rank_world()
    files = _broadcast(_list_files(root) if rank == 0 else None)
    entries: Dict[str, Dict[str, object]] = {}
    for part in _gather(known or {}):
        entries.update(part)
    todo = [rel for rel in files if rel not in entries]
    mine = {rel: file_entry(os.path.join(root, rel)) for i, rel in enumerate(todo) if i % world == rank}
    for part in _gather(mine):
        entries.update(part)
    entries = {rel: entries[rel] for rel in files}
    if rank == 0:
        atomic_write_json(
            os.path.join(root, MANIFEST_FILE),
            {"version": MANIFEST_VERSION, "hash": "sha256", "table_sha256": _table_digest(entries), "files": entries},
        )
    return entries


def _table_digest(entries: Dict[str, Dict[str, object]]) -> str:
    """SHA-256 of the file table itself: damage to the manifest is blamed on the manifest, not on a file."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _read_manifest(root: str) -> tuple:
    """(entries, problem): the manifest's file table, or None and why it cannot be used."""
    p = os.path.join(root, MANIFEST_FILE)
    if not os.path.isfile(p):
        return None, f"{p} is missing (the save did not finish, or the folder was not written by egrsd)"
    try:
        with open(p) as f:
            m = json.load(f)
        files = m["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and "size" in e and "sha256" in e for e in files.values()
        ):
            raise ValueError("'files' is not a table of {size, sha256}")
        if m.get("table_sha256") != _table_digest(files):
            raise ValueError("its file table does not match its own table_sha256")
        return files, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{p} is damaged ({type(e).__name__}: {e})"


def _check(root: str, rel: str, entry: Dict[str, object]) -> Optional[str]:
    p = os.path.join(root, rel)
    if not os.path.isfile(p):
        return f"{p} is missing"
    size = os.path.getsize(p)
    if size != entry["size"]:
        return f"{p} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    if file_digest(p) != entry["sha256"]:
        return f"{p} does not match its SHA-256 in the manifest (damaged)"
    return None


def verify_manifest(root: str) -> List[str]:
    """Collective: the problems of the folder against its manifest (empty: complete and undamaged).

    Every rank returns the same list: rank 0 reads the manifest, each rank checks its share of the files.
    """
    rank, world = _rank_world()
    entries, problem = _broadcast(_read_manifest(root) if rank == 0 else None)
    if problem is not None:
        return [problem]
    mine = [
        msg
        for i, (rel, e) in enumerate(sorted(entries.items()))
        if i % world == rank
        for msg in [_check(root, rel, e)]
        if msg
    ]
    return sorted(msg for part in _gather(mine) for msg in part)
