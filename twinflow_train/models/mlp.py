"""The embedded default network: a residual MLP with adaLN-zero conditioning.

Works on flattened latents ``[B, C, H, W]``; the prompt is a class label, with
index ``num_classes`` the null prompt used for classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Cond, FlowModel
from .embeddings import GatedTimeEmbedding


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 3 * hidden)
        self.fc1 = nn.Linear(hidden, expansion * hidden)
        self.fc2 = nn.Linear(expansion * hidden, hidden)
        # adaLN-zero: every block starts as the identity
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(nn.functional.silu(self.fc1(y)))


class MLPFlowModel(FlowModel):
    block_types = (MLPBlock,)

    def __init__(self, *, shape: tuple[int, int, int], num_classes: int, hidden: int, depth: int,
                 time_dim: int, sign_embedding: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        self.num_classes = num_classes
        dim = shape[0] * shape[1] * shape[2]
        self.inp = nn.Linear(dim, hidden)
        self.time = GatedTimeEmbedding(time_dim, hidden, sign_embedding=sign_embedding)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.out_modulation = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out_modulation.weight)
        nn.init.zeros_(self.out_modulation.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Cond) -> torch.Tensor:
        c = nn.functional.silu(self.time(t, tt) + self.label(cond["labels"]))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=-1)
        h = self.out_norm(h) * (1 + scale) + shift
        # a fresh tensor, not a view: FSDP2 hooks the root output for backward
        return self.out(h).reshape(x.shape).clone()

    def null_cond(self, cond: Cond) -> Cond:
        return {"labels": torch.full_like(cond["labels"], self.num_classes)}

    def init_target_time_embedding(self, mode: str, generator: torch.Generator | None = None) -> None:
        self.time.init_target(mode, generator)
