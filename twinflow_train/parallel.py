"""Process groups, device mesh and FSDP2 placement shared by every model family.

The trainer always runs under FSDP2: at world size 1 the same code path is
exercised (one shard), so a run that works here works under torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .config import ParallelConfig, RunConfig


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(run: RunConfig) -> torch.device:
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device is 'cuda' but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(run: RunConfig, par: ParallelConfig) -> Dist:
    """Join the torchrun group when launched by torchrun, else a private 1-process group."""
    device = resolve_device(run)
    backend = par.backend if par.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend 'nccl' needs a CUDA device")
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
        else:
            # a private in-memory store: no port, no rendezvous, nothing to clash with a parallel run
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)), device=device, mesh=mesh)


def mixed_precision(par: ParallelConfig) -> MixedPrecisionPolicy:
    if par.mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_blocks_then_root(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, par: ParallelConfig) -> nn.Module:
    """fully_shard each block, then the root; the last block keeps its parameters after forward
    because backward needs them first."""
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no block types to shard")
    mp = mixed_precision(par)
    if par.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        block_ids = {id(b) for b in blocks}
        apply_activation_checkpointing(model, check_fn=lambda m: id(m) in block_ids)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=par.reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=par.reshard_after_forward)
    return model


def place_frozen(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, par: ParallelConfig) -> nn.Module:
    """Placement of no-grad copies (EMA target, base model): sharded like the student so local
    shards correspond (EMA lerps them), but every block reshards after forward since no backward
    will ever do it."""
    mp = mixed_precision(par)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    return model


def reshard_all(module: nn.Module) -> None:
    """Return every FSDP unit to its sharded state (no communication)."""
    from torch.distributed.fsdp import FSDPModule
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def all_agree_bad(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True on every rank if any rank saw a bad (non-finite) value. A sync point by design."""
    t = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar telemetry over ranks (a collective: call it on every rank at the same step)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
