"""The network interface the method and trainer see.

A flow model is ``F(x, t, tt, cond) -> velocity`` with the shape of ``x``
(``[B, C, H, W]`` latents), signed current time ``t`` and target time ``tt``
(both ``[B]``), and a condition ``cond``: a dict of tensors whose first dim is
the batch. Families (the embedded MLP, Qwen-Image) implement this class; the
method never looks inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

Cond = dict[str, torch.Tensor]


class FlowModel(nn.Module, ABC):
    #: module classes that are sharded one by one (FSDP2 units, checkpointing units)
    block_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    @abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity prediction F(x_t, t, tt, c)."""

    @abstractmethod
    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional (empty prompt) condition with the batch size of ``cond``."""

    @abstractmethod
    def init_target_time_embedding(self, mode: str, generator: torch.Generator | None = None) -> None:
        """Initialise the new tt-embedding so that behaviour at tt = t is unchanged (docs/method.md §1)."""

    def shard_blocks(self) -> list[nn.Module]:
        """Blocks to wrap individually with ``fully_shard``, in forward order."""
        return [m for m in self.modules() if isinstance(m, self.block_types)]

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in backward: non-reentrant wrappers around ``shard_blocks``
        (a family whose forward calls its blocks in its own way overrides this)."""
        # lazy: a private torch module, loaded only where a model checkpoints its activations
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        block_ids = {id(b) for b in self.shard_blocks()}
        apply_activation_checkpointing(self, check_fn=lambda m: id(m) in block_ids)


def cond_rows(cond: Cond, index: torch.Tensor | slice) -> Cond:
    return {k: v[index] for k, v in cond.items()}


def cond_cat(conds: list[Cond]) -> Cond:
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def cond_len(cond: Cond) -> int:
    return next(iter(cond.values())).shape[0]
