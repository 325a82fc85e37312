"""Write outputs so that a crash never leaves a half-written file or folder behind.

Files: write `<name>.tmp-<pid>` beside the target, fsync, then os.replace (atomic on POSIX).
Folders: build `<name>.tmp-<pid>/`, then rename over the target; an existing target is moved aside
first and deleted only after the rename succeeded, so nothing a user saved is lost on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

from .errors import OutputExistsError


def atomic_write_bytes(path: str, data: bytes) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder; on success it becomes `path`. On an exception it is removed.

    With overwrite=False an existing non-empty `path` is an error (raised before any work starts).
    """
    path = os.path.abspath(path.rstrip("/"))
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise OutputExistsError(
            f"{path} already exists and is not empty: choose another output folder or "
            f"remove it first (nothing was written)"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
