"""bf16 copies of a no-grad network's Linear weights, made once per update instead of on every call.

Under ``parallel.fsdp: never`` with ``mixed_precision: bf16`` the step's forwards run in a CPU (or CUDA)
bf16 autocast. The autocast keeps the bf16 casts of a weight for the rest of the region only for leaf
tensors that require grad (the student's); the EMA target's and the frozen base model's weights are cast
again on every call: the target is called for the CFG pair and each roll-out sub-step, so its every
weight is converted several times a step. ``Bf16Linears`` keeps one bf16 copy of each ``nn.Linear``
weight and bias of such a network, refreshed by one multi-tensor copy (``refresh``, called before the
step's forwards, so it follows the EMA update, a resume and anything else that changed the weights),
and makes those Linears hand the copies to ``F.linear`` while a bf16 autocast is on. The autocast
would have rounded the same fp32 values to bf16 the same way (round to nearest even), so the
products, and every number downstream, are bit for bit those of casting on every call. Outside a
bf16 autocast (validation, sampling, the teacher's metrics) the Linears run on their fp32 weights as
before; the copies are plain attributes, never in a state dict or checkpoint.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        weight, bias = self._bf16_copies  # type: ignore[attr-defined]
        return F.linear(x, weight, bias)
    return F.linear(x, self.weight, self.bias)


def fp32_linears(module: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``module`` whose weights are fp32 (a base model already held in bf16 has none)."""
    return [m for m in module.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]


class Bf16Linears:
    """The bf16 copies of every fp32 ``nn.Linear`` of ``module`` that does not train (see the module docstring)."""

    def __init__(self, module: nn.Module):
        self.linears = fp32_linears(module)
        if not self.linears:
            raise ValueError(f"{type(module).__name__} has no fp32 nn.Linear to keep bf16 copies of")
        trained = [m for m in self.linears if m.weight.requires_grad]
        if trained:
            raise ValueError(f"{type(module).__name__}: {len(trained)} Linear(s) train; the autocast caches those "
                             "casts itself, and a copy made before the update would be stale")
        self.src: list[torch.Tensor] = []
        self.dst: list[torch.Tensor] = []
        for lin in self.linears:
            pair = []
            for p in (lin.weight, lin.bias):
                if p is None:
                    pair.append(None)
                    continue
                copy = torch.empty_like(p, dtype=torch.bfloat16)
                self.src.append(p.detach())
                self.dst.append(copy)
                pair.append(copy)
            lin._bf16_copies = tuple(pair)  # plain attribute: not a parameter or buffer
            lin.forward = types.MethodType(_linear_forward, lin)  # type: ignore[method-assign]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current fp32 weights into the bf16 copies (one multi-tensor copy, rounding to nearest even)."""
        torch._foreach_copy_(self.dst, self.src)
