"""Training data as the trainer sees it: latents plus conditions, drawn deterministically.

Every optimizer step draws its global batch from a generator seeded by
``(seed, step)`` alone, and micro-batch ``m`` (of ``count`` = ranks x accumulation)
takes its own slice. The rows a micro-batch sees are therefore the same whatever
the world size, which is what makes a 2-process run follow the 1-process one, and
what makes resume exact without saving a sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from ..models.base import Cond, cond_rows


def step_generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from a tuple of ints (seed, step, micro-batch, purpose...)."""
    seed = 0
    for p in parts:  # a simple, stable mix; Python's hash() is salted per process
        seed = (seed * 1_000_003 + int(p) + 0x9E3779B1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


class TrainData(Protocol):
    latent_shape: tuple[int, int, int]

    def micro_batch(self, *, step: int, index: int, count: int) -> tuple[torch.Tensor, Cond]:
        """Rows of micro-batch ``index`` out of ``count`` for optimizer ``step``."""

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Cond]]:
        """The fixed held-out rows, in a fixed order."""


@dataclass
class TensorData:
    """In-memory latents (the digits path encodes the whole split once)."""

    train_latents: torch.Tensor
    train_cond: Cond
    val_latents: torch.Tensor
    val_cond: Cond
    batch_size: int
    seed: int

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_latents.shape[1:])  # type: ignore[return-value]

    def micro_batch(self, *, step: int, index: int, count: int) -> tuple[torch.Tensor, Cond]:
        if self.batch_size % count:
            raise ValueError(f"data.batch_size ({self.batch_size}) must divide into {count} micro-batches")
        n = self.train_latents.shape[0]
        gen = step_generator(self.seed, step, 0xDA7A)
        # sample without replacement inside a step; across steps rows repeat (epochs are not a concept here)
        rows = torch.randperm(n, generator=gen)[: self.batch_size] if self.batch_size <= n else \
            torch.randint(0, n, (self.batch_size,), generator=gen)
        size = self.batch_size // count
        mine = rows[index * size:(index + 1) * size]
        return self.train_latents[mine], cond_rows(self.train_cond, mine)

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Cond]]:
        n = self.val_latents.shape[0]
        for i in range(0, n, batch_size):
            sl = slice(i, min(i + batch_size, n))
            yield self.val_latents[sl], cond_rows(self.val_cond, sl)


@dataclass
class Setup:
    """What a run needs besides the network: codec, latent data, prompts, metrics (``setup.build_setup``)."""

    codec: torch.nn.Module
    data: TrainData
    num_classes: int | None
    eval_cond: Callable[[int], Cond]
    """n prompts for the sample metrics (balanced over classes)."""
    sample_cond: Cond
    """The fixed prompts of the sample files (4 per class for digits)."""
    scorer: object | None
    """SampleScorer for FD / reward / accuracy; None where no evaluation network exists."""
