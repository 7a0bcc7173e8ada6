"""Checkpoints: atomic, verifiable, resumable, full (rank-0 file) or sharded (torch.distributed.checkpoint).

A checkpoint directory holds the training state plus ``meta.json`` (the step, the
format and the size and sha256 of every file, written last; see
``rundir.write_checkpoint_meta``). It is written under a temporary name and
renamed into place, so ``latest`` is always either the previous or the new
complete checkpoint; a write that fails (a full disk) removes its temporary
directory and leaves ``latest`` as it was. The replaced ``latest`` becomes
``step-<k>`` when ``checkpoint.keep_latest_k`` > 0.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import rundir
from ..rundir import atomic_path, fsync_dir, fsync_tree
from .parallel import barrier, reshard_all
from .safeload import SafeFileSystemReader, SafeLoadPlanner, data_problem, load_data

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _resharded(*modules: nn.Module) -> None:
    # a block run without grad after its last backward may still hold gathered (plain) weights;
    # state-dict APIs need every parameter in its sharded (DTensor) form
    for m in modules:
        reshard_all(m)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _publish(tmp: Path, final: Path, *, keep_as: Path | None = None) -> None:
    """Swap a finished temporary checkpoint directory into place (rank 0); the one it replaces is
    moved to ``keep_as`` when given, else deleted."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if keep_as is not None and keep_as.exists():
        shutil.rmtree(keep_as)
    if final.exists():
        os.replace(final, keep_as if keep_as is not None else old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _prune_kept(checkpoints: Path, keep: int) -> None:
    for p in rundir.kept_checkpoints(checkpoints.parent)[keep:]:
        shutil.rmtree(p)


def _save_payload(payload: Any, path: Path) -> None:
    """``torch.save`` to a file, fsynced (the one call a disk-full test fails)."""
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, *, fmt: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_modules: dict[str, nn.Module], state: dict[str, Any], step: int,
                    keep_latest_k: int | None = 0, extra_files: dict[str, Path] | None = None,
                    meta: dict[str, Any] | None = None) -> None:
    """Save on all ranks (collective). ``state`` is small trainer state of plain data (dicts, lists, numbers,
    strings, tensors): it is read back with ``weights_only=True``, so anything else could not be loaded.

    ``keep_latest_k`` > 0: the checkpoint this one replaces is kept as ``step-<k>`` beside it,
    and only the newest ``keep_latest_k`` of those are kept; None: outside that rotation (a
    replaced checkpoint of the same name is deleted, ``step-<k>`` are left alone).
    ``extra_files``: name in the checkpoint -> file copied in (rank 0), covered by meta.json's
    checksums like the rest; ``meta``: extra keys of meta.json.
    """
    if fmt not in ("full", "dcp"):
        raise ValueError(f"unknown checkpoint.format {fmt!r}; valid: 'full', 'dcp'")
    _resharded(model, *extra_modules.values())
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        if fmt == "full":
            payload = {"model": get_model_state_dict(model, options=FULL),
                       "extra": {k: get_model_state_dict(m, options=FULL) for k, m in extra_modules.items()},
                       "state": state}
            if optimizer is not None:
                payload["optimizer"] = get_optimizer_state_dict(model, optimizer, options=FULL)
            if _is_main():
                _save_payload(payload, tmp / rundir.STATE_FILE)
        else:
            sharded = {"model": get_model_state_dict(model),
                       "extra": {k: get_model_state_dict(m) for k, m in extra_modules.items()}}
            if optimizer is not None:
                sharded["optimizer"] = get_optimizer_state_dict(model, optimizer)
            dcp.save(sharded, checkpoint_id=str(tmp / rundir.SHARDS_DIR))
            if _is_main():
                _save_payload({"state": state}, tmp / rundir.STATE_FILE)
        barrier()
        if _is_main():
            for name, src in (extra_files or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / name)
                with open(tmp / name, "rb") as f:
                    os.fsync(f.fileno())
            # last: it is what makes the checkpoint complete
            rundir.write_checkpoint_meta(tmp, step=step, fmt=fmt, extra=meta)
            previous = rundir.checkpoint_step(path) if keep_latest_k else None
            keep_as = path.with_name(rundir.kept_name(previous)) if previous is not None else None
            _publish(tmp, path, keep_as=keep_as)
            if keep_latest_k is not None:
                _prune_kept(path.parent, keep_latest_k)
    except BaseException as e:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space; the previous checkpoint is untouched
        disk = _os_error(e)
        if disk is not None and disk is not e:
            # torch.save reports a failed write as a RuntimeError about zip positions: say what happened
            raise OSError(disk.errno, f"{disk.strerror}: checkpoint of step {step} not written "
                                      f"({path.name} kept as it was)") from e
        raise
    barrier()


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception (itself, or what it was raised while handling), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class CheckpointError(RuntimeError):
    """No checkpoint of a run directory verifies and the run may not start again from step 0."""


def choose_resume_point(run_dir: Path, *, restart_on_corrupt: bool) -> tuple[rundir.ResumePoint, list[dict[str, Any]]]:
    """The newest checkpoint that verifies (rank 0 checks, every rank follows) and the event records to log.

    Verifying is the checksums of meta.json and then ``safeload.data_problem``: a checkpoint whose state is
    not plain data (a pickle that would run code) is passed over like a corrupt one, unread.

    Passing over a checkpoint is an ``event`` record (``checkpoint_fallback``) at the step resumed from;
    with checkpoints present but none valid the run fails with ``CheckpointError`` naming each and why,
    unless ``restart_on_corrupt``, which starts from step 0 with a ``restart`` event.
    """
    box = [rundir.find_resume_point(run_dir, check=data_problem) if _is_main() else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    point: rundir.ResumePoint = box[0]
    events: list[dict[str, Any]] = []
    if point.rejected and point.path is not None:
        events.append({"step": point.step, "kind": "event", "event": "checkpoint_fallback",
                       "checkpoint": f"{rundir.CHECKPOINTS_DIR}/{point.path.name}", "reason": point.rejected_text()})
    elif point.rejected:
        if not restart_on_corrupt:
            raise CheckpointError(f"{run_dir}: no checkpoint verifies ({point.rejected_text()}); nothing was "
                                  f"loaded or changed. Pass {rundir.RESTART_FLAG} to start again from step 0")
        events.append({"step": 0, "kind": "event", "event": "restart", "checkpoint": None,
                       "reason": point.rejected_text()})
    return point, events


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Restore in place on all ranks; returns the trainer ``state`` dict. Every file is read as data
    (``safeload``): one that is not raises ``NotDataError`` naming it, and nothing in it runs."""
    _resharded(model, *extra_modules.values())
    path = Path(path)
    meta = rundir.read_json(path / rundir.META_FILE)
    if meta is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no {rundir.META_FILE})")
    if meta["format"] == "full":
        payload = load_data(path / rundir.STATE_FILE)
        set_model_state_dict(model, payload["model"], options=StateDictOptions(full_state_dict=True))
        for k, m in extra_modules.items():
            set_model_state_dict(m, payload["extra"][k], options=StateDictOptions(full_state_dict=True))
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, payload["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        return payload["state"]
    if meta["format"] == "dcp":
        sharded = {"model": get_model_state_dict(model),
                   "extra": {k: get_model_state_dict(m) for k, m in extra_modules.items()}}
        if optimizer is not None:
            sharded["optimizer"] = get_optimizer_state_dict(model, optimizer)
        dcp.load(sharded, storage_reader=SafeFileSystemReader(str(path / rundir.SHARDS_DIR)), planner=SafeLoadPlanner())
        set_model_state_dict(model, sharded["model"])
        for k, m in extra_modules.items():
            set_model_state_dict(m, sharded["extra"][k])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
        return load_data(path / rundir.STATE_FILE)["state"]
    raise ValueError(f"{path}: unknown checkpoint format {meta['format']!r}")


def save_weights(path: Path, model: nn.Module) -> None:
    """Gather the full weights (collective) and write them atomically on rank 0."""
    _resharded(model)
    sd = get_model_state_dict(model, options=FULL)
    if _is_main():
        with atomic_path(path) as tmp:
            torch.save(sd, tmp)
    barrier()


def load_weights(path: Path, model: nn.Module) -> None:
    _resharded(model)
    sd = load_data(path)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def copy_checkpoint(src: Path, dst: Path) -> None:
    if not _is_main():
        return
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # file by file (copytree would fold an ENOSPC into a shutil.Error); meta.json travels with its files
        for f in sorted(Path(src).rglob("*")):
            if f.is_file():
                dst_file = tmp / f.relative_to(src)
                dst_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst_file)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, Path(dst))
