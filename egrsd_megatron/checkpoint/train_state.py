"""Training checkpoints: model, optimizer, scheduler, every rank's RNG, data position, step.

Two layouts, chosen by `train.ckpt_format` when saving; loading reads the format that
`model/egrsd_checkpoint.json` names (`load_train_state` dispatches on it), so a run resumes either.

torch (Megatron-LM's per-rank files; resume at the same TP x PP):
    <root>/step_00000010/
        model/                                            the weights, in megatron_format's layout (Megatron-LM
                                                          per-rank files + egrsd_checkpoint.json + tokenizer/):
                                                          `egrsd eval --model` and `egrsd convert megatron-to-hf
                                                          --ckpt` take this folder as it is
        optim/mp_rank_<tp:02d>[_<pp:03d>].pt              optimizer + scheduler (+ sync teacher) per model-parallel
                                                          shard, written by data-parallel rank 0; with
                                                          parallel.distributed_optimizer its "optimizer" holds
                                                          only the param groups (hyper-parameters) and
        optim/mp_rank_<tp:02d>[_<pp:03d>]_dp_<dp:03d>.pt  each data-parallel rank's ZeRO-1 shard of the Adam
                                                          states, keyed by global parameter index
        rng/rank_<global:05d>.pt                          python, numpy, torch, Megatron tracker RNG
        trainer_state.json                                step, data sampler position, counters, config
        manifest.json                                     every file above with its size and SHA-256, written
                                                          last (manifest.py)
    <root>/latest                                         names the newest COMPLETE step folder
torch_dist (Megatron-Core dist_checkpointing; resumes at any TP x PP x DP, model and Adam states resharded):
    <root>/step_00000010/
        model/                                            ONE dist_checkpointing folder (dist_format.py): the
                                                          weights, the Adam states (exp_avg, exp_avg_sq, fp32
                                                          master) sharded like their parameters, the sync
                                                          teacher (dist_train_state.py); + egrsd_checkpoint.json
                                                          + tokenizer/. Megatron-LM keeps model and optimizer in
                                                          one folder the same way; `egrsd eval --model`,
                                                          `egrsd convert megatron-to-hf` and Megatron's own
                                                          `dist_checkpointing.load` read the weights from it
        optim/state.pt                                    param groups' hyper-parameters, the Adam step, the
                                                          scheduler: identical on every rank, written by rank 0
        rng/rank_<global:05d>.pt, trainer_state.json, manifest.json     as above
    The small files stay out of dist_checkpointing's common state on purpose: they are read with
    safe_load.load_pt like the torch layout's, and the RNG states differ per rank (common state is one).
Saving runs in parts, so that an asynchronous save can run the tensor writes in between:
    prepare_save (temp folder) -> write part (WRITERS[fmt]; torch_dist: write_torch_dist_files, whose
    `async_save=True` returns dist_checkpointing's AsyncRequest) -> check_written (every rank succeeded)
    -> finalize_save (manifest, rename, `latest`, prune).
Atomicity: every rank writes into `step_N.tmp/`; the ranks agree that every write succeeded (a failed
rank removes nothing the previous checkpoints hold: only the temp folder is dropped), the manifest is
written, then rank 0 renames the folder to `step_N`, rewrites `latest` (temp file + rename), and prunes
to the last `keep_last`. A crash at any point leaves `latest` naming a complete checkpoint.
Resume (`resolve_resume`): a folder is used only when its manifest verifies; `train.resume=auto` takes
the newest step folder that does and warns about each newer damaged one it skips. Every `.pt` file is
read with `safe_load.load_pt` (weights_only: no code from a checkpoint ever runs); torch_dist's pickled
`.metadata` and common.pt are checked the same way before dist_checkpointing reads them (dist_format.py).
Optimizer kinds: the full state and the ZeRO-1 shards use the same global parameter numbering, so a
checkpoint resumes with either `parallel.distributed_optimizer` setting and any data-parallel size (torch:
each rank reads the shard files one at a time and keeps the states of the parameters it owns; torch_dist:
each rank asks dist_checkpointing for the states of the parameters it owns).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..utils import atomic_write_json, atomic_write_text
from ..utils.errors import ConfigError, InputError, MissingInputError
from . import dist_format, dist_train_state
from .formats import load_checkpoint, save_checkpoint
from .manifest import verify_manifest, write_manifest
from .megatron_format import TOKENIZER_DIR, mp_rank_dir
from .metadata import read_metadata
from .optimizer_state import is_sharded, owned_indices, param_groups_state, shard_state
from .safe_load import load_pt

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_RE = re.compile(r"^step_\d{8}\.tmp$")


class DamagedCheckpointError(InputError):
    """A checkpoint folder's files do not match its manifest (missing, truncated, altered)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> Dict[str, Any]:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import tensor_parallel

    # numpy's state as a tensor and plain numbers (not numpy objects): loadable with weights_only=True and
    # no allowlisted globals (safe_load.py).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _tracked(root: str) -> Optional[str]:
    """The folder name `root/latest` holds, or None (no tracker, or an unreadable one)."""
    try:
        with open(os.path.join(root, "latest")) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def step_folders(root: str) -> List[str]:
    """The step folders under `root`, newest first (temp folders of unfinished saves excluded)."""
    if not os.path.isdir(root):
        return []
    return [
        os.path.join(root, n)
        for n in sorted((n for n in os.listdir(root) if STEP_RE.match(n)), reverse=True)
        if os.path.isdir(os.path.join(root, n))
    ]


def verify_checkpoint(path: str) -> None:
    """Collective: raise DamagedCheckpointError naming every missing or damaged file of `path`."""
    problems = verify_manifest(path)
    if problems:
        raise DamagedCheckpointError(f"checkpoint {path} is incomplete or damaged: " + "; ".join(problems))


def find_latest(root: str) -> Optional[str]:
    """Collective: the newest step folder under `root` whose manifest verifies, or None if there is none.

    A newer folder that fails (a damaged file, a save killed before its manifest) is skipped with a
    warning naming its problems; `latest` normally names the result, and a tracker that names something
    else is reported too. Folders exist but none verifies: DamagedCheckpointError listing them all.
    """
    folders = step_folders(root)
    skipped = []
    for path in folders:
        problems = verify_manifest(path)
        if not problems:
            tracked = _tracked(root)
            if skipped or tracked != os.path.basename(path):
                log.warning(
                    "train.resume=auto: resuming from %s, the newest complete checkpoint (%s names %r)%s",
                    path,
                    os.path.join(root, "latest"),
                    tracked,
                    "".join(f"; skipped {p}: {'; '.join(why)}" for p, why in skipped),
                )
            return path
        skipped.append((path, problems))
    if skipped:
        raise DamagedCheckpointError(
            f"train.resume=auto: no complete checkpoint in {root}: "
            + " | ".join(f"{p}: {'; '.join(why)}" for p, why in skipped)
            + ". Set train.resume=none to start over, or train.resume=<folder> after repairing one"
        )
    return None


def resolve_resume(resume: Optional[str], root: str) -> Optional[str]:
    """Collective: the checkpoint folder `train.resume` selects, verified against its manifest, or None.

    auto: the newest complete folder under `root` (find_latest; None when there is none). none / "":
    None. A folder: that one, which must verify (no fallback: the user named it).
    """
    if resume == "auto":
        return find_latest(root)
    if resume in ("none", "", None):
        return None
    if not os.path.isdir(resume):
        raise ConfigError(f"train.resume={resume}: no such checkpoint folder")
    verify_checkpoint(resume)
    return resume


def _all_ok(ok: bool) -> bool:
    """Collective: whether `ok` holds on every rank."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_train_state(
    root: str,
    step: int,
    model: torch.nn.Module,
    arch,
    optimizer,
    scheduler,
    trainer_state: Dict[str, Any],
    keep_last: int,
    teacher: Optional[torch.nn.Module] = None,
    tokenizer=None,
    fmt: str = "torch",
    async_saver=None,
) -> str:
    """Collective: every rank calls it. Returns the final step folder. `fmt`: train.ckpt_format.

    Synchronous: prepare_save, the format's write part, check_written, finalize_save (the async save
    runs the same parts, with the torch_dist write's AsyncRequest scheduled between write and check).
    Any rank failing (disk full, an exception) makes every rank raise after the temp folder is removed;
    the existing checkpoints and `latest` are not touched until the new folder is complete.
    """
    if fmt not in WRITERS:
        raise ConfigError(f"train.ckpt_format={fmt!r}: expected one of {', '.join(sorted(WRITERS))}")
    if async_saver is not None:
        state = (model, arch, optimizer, scheduler, trainer_state, teacher, tokenizer)
        return _save_async(root, step, keep_last, async_saver, fmt, state)
    tmp = prepare_save(root, step)
    err: Optional[BaseException] = None
    try:
        WRITERS[fmt](tmp, step, model, arch, optimizer, scheduler, trainer_state, teacher, tokenizer)
    except BaseException as e:  # noqa: BLE001 - every rank must learn of it before anything is renamed
        err = e
    check_written(tmp, err)
    return finalize_save(root, step, tmp, keep_last)


def _save_async(root: str, step: int, keep_last: int, saver, fmt: str, state: tuple) -> str:
    """save_train_state with `async_saver` (train.async_save; checkpoint/async_save.py): returns step_N's path
    once the tensors are staged and the writer runs; the saver finalizes it once written on every rank.

    The previous save is finalized first, before prepare_save drops unfinished temp folders. A failure while
    staging raises on every rank like a synchronous save (a writer already started is then abandoned by the
    trainer, which is failing).
    """
    if fmt != "torch_dist":
        raise ConfigError(f"train.async_save=true needs train.ckpt_format=torch_dist, not {fmt!r}")
    saver.wait()
    tmp = prepare_save(root, step)
    final = os.path.join(root, step_dir_name(step))
    err: Optional[BaseException] = None
    try:
        request = write_torch_dist_files(tmp, step, *state, async_save=True)
        finalize = lambda entries: finalize_save(root, step, tmp, keep_last, known=entries)
        saver.schedule(request, final, finalize=finalize, root=tmp)
    except BaseException as e:  # noqa: BLE001 - as in save_train_state
        err = e
    check_written(tmp, err)
    return final


def prepare_save(root: str, step: int) -> str:
    """Collective: rank 0 drops the temp folders of saves killed earlier and makes `step_N.tmp/` (with
    rng/ and optim/); returns that temp folder once every rank may write into it."""
    tmp = os.path.join(root, step_dir_name(step)) + ".tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for n in os.listdir(root):  # temp folders of saves killed earlier (one run writes a root at a time)
            if TMP_RE.match(n):
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
        os.makedirs(os.path.join(tmp, "optim"))
    _barrier()
    return tmp


def check_written(tmp: str, err: Optional[BaseException]) -> None:
    """Collective: return only if every rank wrote its files (`err` is this rank's failure, or None).

    Otherwise rank 0 removes the temp folder and every rank raises: its own error, or one saying another
    rank failed. The previous checkpoints and `latest` are untouched either way.
    """
    if _all_ok(err is None):
        return
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    if err is not None:
        raise err
    raise RuntimeError(f"saving {tmp[: -len('.tmp')]} failed on another rank; the previous checkpoints are unchanged")


def finalize_save(root: str, step: int, tmp: str, keep_last: int, known: Optional[Dict] = None) -> str:
    """Collective, after check_written: the manifest, then rank 0 renames `step_N.tmp` to `step_N`, moves
    `latest` (temp file + rename) and prunes to the newest `keep_last` step folders. Returns step_N.
    `known`: manifest entries this rank already has (write_manifest; an async save's writer hashed them)."""
    final = os.path.join(root, step_dir_name(step))
    write_manifest(tmp, known=known)  # last: a folder with a matching manifest is complete
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        old = None
        if os.path.exists(final):  # the same step saved again: moved aside, deleted once replaced
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), step_dir_name(step) + "\n")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        steps = sorted(n for n in os.listdir(root) if STEP_RE.match(n))
        for name in steps[:-keep_last]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier()
    return final


def write_torch_dist_files(
    tmp: str,
    step: int,
    model,
    arch,
    optimizer,
    scheduler,
    trainer_state,
    teacher=None,
    tokenizer=None,
    async_save: bool = False,
):
    """This rank's part of a torch_dist checkpoint, into the temp folder (collective).

    model/: one `dist_checkpointing.save` of the model's sharded state dict, the Adam states sharded like
    their parameters and the sync teacher (dist_train_state.train_sharded_state_dict), then this format's
    egrsd_checkpoint.json and tokenizer/; optim/state.pt, rng/ and trainer_state.json as small files.
    With `async_save` the tensor writes are left to the returned AsyncRequest (`dist_checkpointing.save(...,
    async_sharded_save=True)`): the caller schedules it, then calls check_written and finalize_save once
    it completed on every rank. Synchronous: returns None with everything written.
    """
    small = dist_train_state.small_optimizer_state(optimizer)  # collective (checks the step on every rank)
    request = dist_train_state.save_sharded(
        os.path.join(tmp, "model"), model, arch, optimizer, teacher, step, tokenizer, async_save=async_save
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        small.update(opt_param_scheduler=scheduler.state_dict(), iteration=step)
        torch.save(small, os.path.join(tmp, "optim", dist_train_state.STATE_FILE))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)
    return request


def write_torch_files(
    tmp: str, step: int, model, arch, optimizer, scheduler, trainer_state, teacher=None, tokenizer=None
) -> None:
    """This rank's part of a torch-format checkpoint, into the temp folder (model shard, optimizer, RNG,
    trainer state)."""
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    rank = dist.get_rank() if dist.is_initialized() else 0
    model_dir = save_checkpoint(model, arch, os.path.join(tmp, "model"), extra_meta={"iteration": step})
    if rank == 0 and tokenizer is not None and not os.path.isdir(os.path.join(model_dir, TOKENIZER_DIR)):
        tokenizer.save_pretrained(os.path.join(model_dir, TOKENIZER_DIR))
    sharded = is_sharded(optimizer)
    if sharded:  # ZeRO-1: every data-parallel rank writes its own shard of the Adam states
        torch.save(
            {
                "state": shard_state(optimizer),
                "dp_rank": ps.get_data_parallel_rank(),
                "dp_size": ps.get_data_parallel_world_size(),
            },
            os.path.join(tmp, "optim", _shard_file(ps.get_data_parallel_rank())),
        )
    if ps.get_data_parallel_rank() == 0:
        payload = {
            "optimizer": param_groups_state(optimizer) if sharded else optimizer.state_dict(),
            "optimizer_shards": ps.get_data_parallel_world_size() if sharded else 0,
            "opt_param_scheduler": scheduler.state_dict(),
            "iteration": step,
        }
        if teacher is not None:
            payload["teacher"] = teacher.state_dict()
        torch.save(payload, os.path.join(tmp, "optim", _optim_file()))
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), trainer_state)


# train.ckpt_format -> this rank's write part (tmp, step, model, arch, optimizer, scheduler, trainer_state,
# teacher, tokenizer); the names are config/schema.py's TrainConfig.ckpt_format choices.
WRITERS = {"torch": write_torch_files, "torch_dist": write_torch_dist_files}


def _optim_file() -> str:
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    return (
        mp_rank_dir(
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(),
        )
        + ".pt"
    )


def _shard_file(dp_rank: int) -> str:
    return _optim_file()[: -len(".pt")] + f"_dp_{dp_rank:03d}.pt"


def _optimizer_state(path: str, payload: Dict[str, Any], optimizer) -> Dict[str, Any]:
    """The optimizer state_dict to load on this rank: the full one, or the ZeRO-1 shards merged (keeping
    only the states this rank's optimizer owns when it is itself sharded)."""
    sd = payload["optimizer"]
    keep = owned_indices(optimizer) if is_sharded(optimizer) else None
    n = int(payload.get("optimizer_shards", 0))
    if n == 0:
        if keep is not None:
            sd = {**sd, "state": {i: st for i, st in sd["state"].items() if i in keep}}
        return sd
    state: Dict[int, Any] = {}
    for r in range(n):
        f = os.path.join(path, "optim", _shard_file(r))
        if not os.path.isfile(f):
            raise MissingInputError(
                f"{f} is missing: the checkpoint {path} was written with parallel.distributed_optimizer=true at "
                f"data-parallel size {n} and needs all {n} optimizer shard files; the checkpoint is incomplete "
                f"(resume from another step folder)"
            )
        shard = load_pt(f, "a ZeRO-1 optimizer shard")
        state.update({i: st for i, st in shard["state"].items() if keep is None or i in keep})
        del shard
    return {**sd, "state": state}


def load_train_state(
    path: str,
    model: torch.nn.Module,
    arch,
    optimizer,
    scheduler,
    teacher: Optional[torch.nn.Module] = None,
    verified: bool = False,
) -> Dict[str, Any]:
    """Collective: restore this rank's model shard, optimizer, scheduler and RNG; return trainer_state.json.

    The folder is checked against its manifest first unless `verified` (resolve_resume did it). The
    format is the one `model/egrsd_checkpoint.json` names (not train.ckpt_format: a run resumes either).
    torch: written at the same TP x PP (optimizer states are per model shard). torch_dist: any TP x PP
    (model and Adam states resharded); the RNG states are restored only at the layout that wrote them
    (another layout's per-rank streams mean nothing here; the run continues from its own seeding).
    Both: the data-parallel size and `parallel.distributed_optimizer` may differ from the run that wrote it.
    """
    # lazy: megatron.core takes seconds to import (and warns without TE/Apex); plan/convert/eval import this module
    from megatron.core import parallel_state as ps

    if not verified:
        verify_checkpoint(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_dir = os.path.join(path, "model")
    if read_metadata(model_dir)["format"] == dist_format.FORMAT:
        small = load_pt(os.path.join(path, "optim", dist_train_state.STATE_FILE), "optimizer and scheduler state")
        sd = dist_train_state.load_sharded(model_dir, model, arch, optimizer, teacher, small)
        meta = read_metadata(model_dir)
        layout = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        same_layout = (int(meta["tp"]), int(meta["pp"]), meta.get("world_size")) == (*layout, dist.get_world_size())
        scheduler_state = small["opt_param_scheduler"]
    else:
        file = os.path.join(path, "optim", _optim_file())
        if not os.path.isfile(file):
            raise MissingInputError(
                f"{file} is missing: the checkpoint {path} was written with a different "
                f"tensor/pipeline parallel layout (resume at the same parallel.tp / parallel.pp)"
            )
        payload = load_pt(file, "optimizer and scheduler state")
        load_checkpoint(model, arch, model_dir)
        sd = _optimizer_state(path, payload, optimizer)
        if teacher is not None and "teacher" in payload:
            teacher.load_state_dict(payload["teacher"])
        same_layout = True
        scheduler_state = payload["opt_param_scheduler"]
    optimizer.load_state_dict(sd)
    del sd
    if is_sharded(optimizer):
        # ZeroRedundancyOptimizer.load_state_dict also keeps a dtype-cast copy of this rank's states in the
        # wrapper's own `state`, which nothing reads (steps and shard_state use the local optimizer's):
        # free it rather than hold this rank's Adam states (and fp32 masters) twice.
        optimizer.state.clear()
    scheduler.load_state_dict(scheduler_state)
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if same_layout and os.path.isfile(rng_file):
        _set_rng_state(load_pt(rng_file, "RNG state"))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
