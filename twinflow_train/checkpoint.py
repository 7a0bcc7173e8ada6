"""Checkpoints: atomic, resumable, full (rank-0 file) or sharded (torch.distributed.checkpoint).

A checkpoint directory holds the training state plus ``meta.json``; it is
written under a temporary name and renamed into place, so ``latest`` is always
either the previous or the new complete checkpoint.
"""

from __future__ import annotations

import json
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

from .parallel import barrier, reshard_all
from .telemetry import fsync_dir

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _resharded(*modules: nn.Module) -> None:
    # a block run without grad after its last backward may still hold gathered (plain) weights;
    # state-dict APIs need every parameter in its sharded (DTensor) form
    for m in modules:
        reshard_all(m)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _publish(tmp: Path, final: Path) -> None:
    """Swap a finished temporary checkpoint directory into place (rank 0)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(path: Path, *, fmt: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_modules: dict[str, nn.Module], state: dict[str, Any], step: int) -> None:
    """Save on all ranks (collective). ``state`` is small picklable trainer state."""
    _resharded(model, *extra_modules.values())
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _is_main():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if fmt == "full":
        payload = {"model": get_model_state_dict(model, options=FULL),
                   "extra": {k: get_model_state_dict(m, options=FULL) for k, m in extra_modules.items()},
                   "state": state}
        if optimizer is not None:
            payload["optimizer"] = get_optimizer_state_dict(model, optimizer, options=FULL)
        if _is_main():
            with open(tmp / "state.pt", "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
    elif fmt == "dcp":
        sharded = {"model": get_model_state_dict(model),
                   "extra": {k: get_model_state_dict(m) for k, m in extra_modules.items()}}
        if optimizer is not None:
            sharded["optimizer"] = get_optimizer_state_dict(model, optimizer)
        dcp.save(sharded, checkpoint_id=str(tmp / "shards"))
        if _is_main():
            torch.save({"state": state}, tmp / "state.pt")
    else:
        raise ValueError(f"unknown checkpoint.format {fmt!r}; valid: 'full', 'dcp'")
    barrier()
    if _is_main():
        (tmp / "meta.json").write_text(json.dumps({"step": step, "format": fmt}) + "\n")
        _publish(tmp, path)
    barrier()


def checkpoint_step(path: Path) -> int | None:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text())["step"])


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Restore in place on all ranks; returns the trainer ``state`` dict."""
    _resharded(model, *extra_modules.values())
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta["format"] == "full":
        payload = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
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
        dcp.load(sharded, checkpoint_id=str(path / "shards"))
        set_model_state_dict(model, sharded["model"])
        for k, m in extra_modules.items():
            set_model_state_dict(m, sharded["extra"][k])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)["state"]
    raise ValueError(f"{path}: unknown checkpoint format {meta['format']!r}")


def save_weights(path: Path, model: nn.Module) -> None:
    """Gather the full weights (collective) and write them atomically on rank 0."""
    _resharded(model)
    sd = get_model_state_dict(model, options=FULL)
    if _is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    barrier()


def load_weights(path: Path, model: nn.Module) -> None:
    _resharded(model)
    sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True))


def copy_checkpoint(src: Path, dst: Path) -> None:
    if not _is_main():
        return
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _publish(tmp, Path(dst))
