"""Process groups, device mesh and FSDP2 placement shared by every model family.

The trainer runs under FSDP2 whenever it needs it (``parallel.fsdp``): at world
size > 1, under bf16 mixed precision (unless ``never`` asks for plain modules, which
take a bf16 autocast instead), and for the Qwen-Image family. A 1-process
run of the small default model keeps plain modules by default: FSDP2's pre- and
post-forward hooks, DTensor parameters and the single-tensor optimizer path they
force cost more than the model's arithmetic there. ``parallel.fsdp: always``
exercises the sharded path in one process (the tests do, and the 2-process tests
use it by default).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..config import ParallelConfig, RunConfig
from .hostmem import retain_freed_heap


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
    if device.type == "cpu":
        retain_freed_heap()  # the step's tensors live in host memory: no page faults for the same blocks each step
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


def mixed_precision(par: ParallelConfig, *, cast_forward_inputs: bool = True) -> MixedPrecisionPolicy:
    """The FSDP2 policy of ``parallel.mixed_precision``: bf16 compute where asked, fp32 gradient reduction always.

    ``cast_forward_inputs=False`` for a root that casts its own inputs (a family whose times must stay fp32)."""
    param_dtype = torch.bfloat16 if par.mixed_precision == "bf16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                cast_forward_inputs=cast_forward_inputs)


def use_fsdp(par: ParallelConfig, *, world: int, fsdp_in_one_process: bool) -> bool:
    """Whether modules are wrapped with FSDP2 (see the module docstring and ``parallel.fsdp``);
    ``fsdp_in_one_process``: the model family's own answer for a 1-process fp32 run under ``auto``."""
    if par.fsdp == "always":
        return True
    if par.fsdp == "never":
        if world > 1:
            raise ValueError(f"parallel.fsdp 'never' needs one process; this run has {world} "
                             f"(use 'auto' or 'always')")
        return False
    return world > 1 or par.mixed_precision != "fp32" or fsdp_in_one_process


def place_plain(model: nn.Module, par: ParallelConfig, *, frozen: bool) -> nn.Module:
    """The 1-process placement without FSDP2: the module itself, with activation checkpointing on
    its blocks when configured (a trainable model only: no-grad copies never run backward). Under
    ``mixed_precision: bf16`` its output comes back in fp32: the step runs its forwards in
    ``forward_precision``'s bf16 autocast, and the method's arithmetic on the outputs stays fp32."""
    if par.activation_checkpointing and not frozen:
        model.enable_activation_checkpointing()
    if par.mixed_precision == "bf16":
        model.register_forward_hook(_fp32_output)
    return model


def _fp32_output(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def forward_precision(par: ParallelConfig, *, device: torch.device, fsdp: bool) -> ContextManager:
    """The context of a step's forwards: a bf16 autocast for plain modules under ``mixed_precision: bf16``
    (matrix products in bf16, weights and gradients fp32); nothing otherwise (FSDP2 applies its own policy)."""
    if fsdp or par.mixed_precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def shard_blocks_then_root(model: nn.Module, blocks: list[nn.Module], mesh: DeviceMesh, par: ParallelConfig, *,
                           frozen: bool = False, cast_root_inputs: bool = True) -> nn.Module:
    """Activation checkpointing (a trainable model, where configured), ``fully_shard`` each block, then the root.

    ``model`` is a ``FlowModel`` (its ``enable_activation_checkpointing``). A trainable model's last block keeps its parameters after forward because backward needs
    them first. A no-grad copy (EMA target, base model) is sharded like the student, so local
    shards correspond (EMA lerps them), but every unit reshards after forward: no backward will
    ever do it. ``cast_root_inputs``: see ``mixed_precision``.
    """
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no block types to shard")
    if par.activation_checkpointing and not frozen:
        model.enable_activation_checkpointing()
    block_mp = mixed_precision(par)
    root_mp = mixed_precision(par, cast_forward_inputs=cast_root_inputs)
    reshard = par.reshard_after_forward or frozen
    for i, block in enumerate(blocks):
        keep = i == len(blocks) - 1 and not frozen
        fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard and not keep)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=reshard)
    return model


def reshard_all(module: nn.Module) -> None:
    """Return every FSDP2 unit of ``module`` to its sharded state (no communication; a no-op for sharded units)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def agree_bad_flag(flag: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``flag`` (0-dim, 1.0 = bad) maximised over ranks, left on the device: no host read here."""
    t = flag.to(device=device, dtype=torch.float32).reshape(())
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.reshape(1).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.reshape(())
    return t


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
