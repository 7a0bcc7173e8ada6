"""Time embeddings shared by every model family (docs/method.md §1).

``temb = E1(t) + E2(tt) * (t - tt)``: the target-time branch is gated by the
gap, so it vanishes when tt = t and a pretrained network is unchanged there.
Signed t goes straight into the sinusoidal features (sin is odd, so -t and t
differ); an optional learned sign embedding is added where t < 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn


_FREQS: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """``exp(-log(max_period) * k / half)``, k < half: computed once per (size, period, device) and reused,
    since every forward asks for the same table (two per forward, several forwards per training step)."""
    key = (half, float(max_period), device)
    freqs = _FREQS.get(key)
    if freqs is None:
        with torch.inference_mode(False), torch.no_grad():  # a plain constant whatever mode the first caller runs in
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)
        _FREQS[key] = freqs
    return freqs


def sinusoidal(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim] features of ``scale * t`` (DiT-style frequencies)."""
    freqs = _frequencies(dim // 2, max_period, t.device)
    args = (scale * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeMLP(nn.Module):
    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = sinusoidal(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(nn.functional.silu(self.fc1(h)))


class GatedTimeEmbedding(nn.Module):
    def __init__(self, freq_dim: int, out_dim: int, sign_embedding: bool = False):
        super().__init__()
        self.current = TimeMLP(freq_dim, out_dim)  # E1
        self.target = TimeMLP(freq_dim, out_dim)  # E2, gated by (t - tt)
        self.sign = nn.Parameter(torch.zeros(out_dim)) if sign_embedding else None

    def forward(self, t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        gate = (t - tt).to(self.current.fc2.weight.dtype)[:, None]
        emb = self.current(t) + self.target(tt) * gate
        if self.sign is not None:
            emb = emb + (t < 0).to(emb.dtype)[:, None] * self.sign
        return emb

    @torch.no_grad()
    def init_target(self, mode: str, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        if mode == "copy":
            self.target.load_state_dict(self.current.state_dict())
        elif mode == "normal":
            for lin in (self.target.fc1, self.target.fc2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * std)
                lin.bias.zero_()
        else:
            raise ValueError(f"unknown tt_init {mode!r}; valid: 'copy', 'normal'")
