"""EMA of the student, used as the target network T (docs/method.md §2.2).

``ema <- d_k * ema + (1 - d_k) * theta`` after every optimizer update, with the
decay warmed up by ``d_0 = 0, d_{k+1} = d_k + (1 - d_k) * (d_target - d_k) / 2``:
the first update copies the student, and d_k rises toward d_target.

The recursion has no closed form (it is a logistic-type map), so values are
cached per target and extended on demand: amortised O(1) per call. Once the
sequence reaches its floating-point fixed point it is constant, and the cache
stops growing there.
"""

from __future__ import annotations

import threading
from array import array
from dataclasses import dataclass

import torch
from torch import nn

_CACHE: dict[float, array] = {}
_FIXED: dict[float, bool] = {}
_LOCK = threading.Lock()


def ema_decay(k: int, target: float) -> float:
    """d_k of the warm-up recursion toward ``target`` (k = number of EMA updates done before this one)."""
    if k < 0:
        raise ValueError(f"k must be >= 0 (got {k})")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target must be in [0, 1) (got {target})")
    target = float(target)
    with _LOCK:
        seq = _CACHE.setdefault(target, array("d", [0.0]))
        while len(seq) <= k and not _FIXED.get(target, False):
            d = seq[-1]
            nxt = d + (1.0 - d) * (target - d) * 0.5
            if nxt == d:
                _FIXED[target] = True
                break
            seq.append(nxt)
        return seq[k] if k < len(seq) else seq[-1]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_pair(name: str, e: torch.Tensor, m: torch.Tensor) -> None:
    e_dt, m_dt = hasattr(e, "to_local"), hasattr(m, "to_local")
    if e_dt != m_dt:
        raise ValueError(f"ema_update_: parameter {name!r} is sharded in one module and not in the other")
    if e_dt:
        if tuple(e.placements) != tuple(m.placements) or e.device_mesh != m.device_mesh:
            raise ValueError(f"ema_update_: parameter {name!r} has different shardings "
                             f"({e.placements} vs {m.placements}); local shards would not correspond")
    if e.shape != m.shape:
        raise ValueError(f"ema_update_: parameter {name!r} has shape {tuple(e.shape)} in the EMA and "
                         f"{tuple(m.shape)} in the model")


@dataclass(frozen=True)
class EmaPairs:
    """The local tensors an EMA update touches, checked once: parameters to lerp, buffers to copy.

    Valid while neither module's parameters are replaced; plain (unsharded) modules keep theirs
    for their lifetime, so the trainer builds this once per run instead of walking both modules
    by name on every step.
    """

    ema_params: list[torch.Tensor]
    model_params: list[torch.Tensor]
    ema_buffers: list[torch.Tensor]
    model_buffers: list[torch.Tensor]


def ema_pairs(ema: nn.Module, model: nn.Module) -> EmaPairs:
    """Match ``ema``'s parameters and buffers with ``model``'s by name (see ``ema_update_``)."""
    e_params = dict(ema.named_parameters())
    m_params = dict(model.named_parameters())
    if e_params.keys() != m_params.keys():
        missing = sorted(set(m_params) ^ set(e_params))
        raise ValueError(f"ema_update_: the EMA and the model have different parameters: {missing[:5]}")
    e_list, m_list = [], []
    for name, e in e_params.items():
        m = m_params[name]
        _check_pair(name, e, m)
        el, ml = _local(e.detach()), _local(m.detach())
        e_list.append(el)
        m_list.append(ml)
    e_bufs = dict(ema.named_buffers())
    eb, mb = [], []
    for name, b in model.named_buffers():
        if name not in e_bufs:
            raise ValueError(f"ema_update_: buffer {name!r} of the model is missing in the EMA")
        eb.append(_local(e_bufs[name]))
        mb.append(_local(b))
    return EmaPairs(ema_params=e_list, model_params=m_list, ema_buffers=eb, model_buffers=mb)


@torch.no_grad()
def ema_apply_(pairs: EmaPairs, decay: float, *, gate: torch.Tensor | None = None) -> None:
    """``ema = decay * ema + (1 - decay) * model`` on ``pairs``; buffers copied.

    ``gate`` (0-dim tensor on the parameters' device, 1.0 or 0.0) scales the step without a
    host read: 0 leaves the EMA as it is (a skipped optimizer update), 1 is the plain update.
    ``torch.lerp`` is exact at both ends (weight 0 keeps ``ema``, weight 1 gives ``model``),
    so the gated update equals the ungated one bit for bit.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (got {decay})")
    if pairs.ema_params:
        model_params = pairs.model_params
        if any(m.dtype != e.dtype for e, m in zip(pairs.ema_params, model_params)):
            model_params = [m.to(e.dtype) for e, m in zip(pairs.ema_params, model_params)]  # e.g. a bf16 student
        if gate is not None:
            torch._foreach_lerp_(pairs.ema_params, model_params, gate * (1.0 - decay))
        elif decay == 0.0:
            torch._foreach_copy_(pairs.ema_params, model_params)  # exact copy (the first warm-up update)
        else:
            torch._foreach_lerp_(pairs.ema_params, model_params, 1.0 - decay)
    if pairs.ema_buffers:
        if gate is None:
            torch._foreach_copy_(pairs.ema_buffers, pairs.model_buffers)
        else:
            for e, m in zip(pairs.ema_buffers, pairs.model_buffers):
                e.copy_(torch.where(gate > 0, m, e))


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ``ema = decay * ema + (1 - decay) * model`` on parameters; buffers copied.

    Works on plain tensors and on FSDP2-sharded (DTensor) parameters: both modules
    must be sharded the same way, and each rank updates its local shards (no
    communication).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (got {decay})")
    ema_apply_(ema_pairs(ema, model), decay)
