"""Gradient norms, clipping and the two-term (TwinFlow + RL) backward, FSDP2-aware.

Under FSDP2 every parameter gradient is a ``DTensor`` sharded over the device
mesh (``Shard(0)`` per rank; ``(Replicate, Shard)`` under HSDP). A norm or an
inner product is a sum of local contributions that must be reduced over the
mesh dimensions the tensor is *sharded* on and not over those it is
*replicated* on. Here the local sums of every gradient that shares a
(mesh, placements) layout are stacked and reduced with one collective per
layout (normally one per call), and plain tensors (single process, frozen
non-sharded modules) are summed locally. Every rank gets the same value.

Two-term step (docs/method.md §5, parameter-space RL clipping). The TwinFlow loss and the
RL surrogate share one forward pass. ``TermGradients`` back-propagates them
separately over that graph (the RL term first, ``retain_graph=True``), keeps
each term's gradient in its own buffer across micro-batches, and at the end of
the optimizer step writes ``g = g_tw + c * g_rl`` into ``.grad`` with
``c = min(1, clip_norm / |g_rl|)``. The global clip of the sum stays with the
trainer (``clip_grads_``), which logs its pre-clip norm as ``grad_norm/total``.

Why two backward passes over one graph are sound under FSDP2: FSDP2's
pre-backward hooks sit on the forward outputs and its post-backward hooks on
autograd nodes of the module inputs; a retained graph fires both again, so
each backward all-gathers what it needs and ends with a reduce-scatter into
``.grad``. This is checked by ``tests/twinflow_train/run/test_grads.py`` at world
size 1 and 2 (gloo), with and without activation checkpointing and
``reshard_after_forward``: the two term gradients add up to the
single-backward gradient of the sum. One condition: the per-term split needs a
reduce-scatter at the end of *every* backward (otherwise FSDP2 keeps the
unsharded gradient internally and ``.grad`` would not show the term), so in
split mode ``TermGradients`` turns gradient sync on for each backward; with
gradient accumulation this costs one reduce-scatter per micro-batch and term.

Memory. A split step holds two sharded fp32 gradient sets during the TwinFlow backward (the RL term's,
stashed, and the fresh ``.grad``). ``stash="host"`` keeps the RL term's local shards in host memory
instead (copied out after its backward, brought back one tensor at a time in ``finish``): the same
values, one gradient set on the device, a device-host round trip of one set per split step. And a step
that only needs the RL clip (``rl.clip: param``, one micro-batch, no telemetry) clips in place
(``start(split=False, clip_in_place=True)``): RL backward, ``c = min(1, clip_norm / |g_rl|)``, ``.grad *=
c``, then the TwinFlow backward accumulates onto it: ``g_tw + c * g_rl`` (the same sum ``finish``
writes in split mode) without a second set; its stats are ``grad_norm/rl``, ``grad_norm/rl_clipped``
and ``rl/clip_coef`` only.

Telemetry (split mode), all 0-dim tensors, no host sync:

- ``grad_norm/twinflow``: |g_tw|
- ``grad_norm/rl``: |g_rl| before the RL clip (g_rl already carries the RL weight)
- ``grad_norm/rl_clipped``: |c * g_rl| (= ``clip_norm`` when the clip is active)
- ``grad_cos/twinflow_rl``: <g_tw, g_rl> / (|g_tw| |g_rl|); 0 when either is exactly zero
  (e.g. before the RL warm-up), NaN/inf propagate
- ``rl/clip_coef``: c
- ``rl/share``: the RL term's share of the combined update by projection,
  <c g_rl, g> / |g|^2 with g = g_tw + c g_rl. The two shares (TwinFlow's is
  ``1 - rl/share``) add to 1; a negative value means the RL term opposes the
  TwinFlow term along the update direction. 0 when g is exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # DTensor is public from torch 2.5 on
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["grad_norm", "clip_grads_", "global_sums", "TermGradients"]


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor's data on this rank (the local shard of a DTensor, which shares its storage)."""
    return t.to_local() if _is_dtensor(t) else t


def _layout(t: torch.Tensor):
    """Key of the reduction a local sum of ``t`` needs: None for a plain tensor, else
    (mesh, placements) with Partial on sharded mesh dims and Replicate elsewhere."""
    if not _is_dtensor(t):
        return None
    if any(p.is_partial() for p in t.placements):
        # a pending (unreduced) gradient: its square is not the sum of local squares
        raise ValueError("gradient DTensor has a Partial placement; reduce it before taking norms")
    reduce = tuple(Partial() if p.is_shard() else Replicate() for p in t.placements)
    return t.device_mesh, reduce


def global_sums(pairs: Iterable[tuple[torch.Tensor | None, list[torch.Tensor]]]) -> torch.Tensor:
    """Global sums of per-tensor local statistics.

    ``pairs`` yields ``(layout_tensor, [s_1, ..., s_n])``: ``s_j`` are 0-dim local
    sums (e.g. a squared norm, an inner product) of tensors laid out like
    ``layout_tensor``; ``None`` entries are skipped. Returns the ``[n]`` vector of
    the sums over every element of every tensor on every rank, with one
    collective per distinct layout.
    """
    groups: dict[object, torch.Tensor] = {}
    n = None
    for ref, stats in pairs:
        if ref is None:
            continue
        vec = torch.stack([s.float() for s in stats])
        n = vec.numel()
        key = _layout(ref)
        groups[key] = groups[key] + vec.to(groups[key].device) if key in groups else vec
    if n is None:
        raise ValueError("no gradients to reduce (every parameter's grad is None)")
    total: torch.Tensor | None = None
    for key, vec in groups.items():
        if key is not None:
            mesh, placements = key
            vec = DTensor.from_local(vec, mesh, placements, run_check=False).full_tensor()
        total = vec if total is None else total + vec.to(total.device)
    assert total is not None
    return total


def _grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the parameters' gradients (plain or DTensor-sharded), equal on every rank."""
    grads = _grads(params)
    if grads and not any(_is_dtensor(g) for g in grads):
        # plain tensors (one process): one multi-tensor kernel instead of a norm per parameter
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        return torch.linalg.vector_norm(torch.stack(norms))
    sq = global_sums((g, [_sq(_local(g))]) for g in grads)
    return sq[0].sqrt()


def _sq(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)).square()


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1).float(), b.reshape(-1).float())


def clip_grads_(params: Iterable[torch.Tensor], *, max_norm: float,
                norm: torch.Tensor | None = None) -> torch.Tensor:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the pre-clip norm.

    ``norm`` may pass a norm already computed for these gradients. A non-finite
    norm leaves the gradients untouched: the trainer's non-finite policy acts on
    the returned value (scaling by 0 or NaN would hide or spread the problem).
    No host synchronisation.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (got {max_norm})")
    params = list(params)
    if norm is None:
        norm = grad_norm(params)
    # the 1e-6 keeps the ratio finite at norm = 0 (nothing to clip then; coef clamps to 1)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
    grads = [_local(g) for g in _grads(params)]
    if grads and all(g.device == coef.device and g.dtype == coef.dtype for g in grads):
        torch._foreach_mul_(grads, coef)
    else:
        for loc in grads:
            loc.mul_(coef.to(loc.device, loc.dtype))
    return norm


@dataclass
class TermGradients:
    """Per-term gradient accumulation over one optimizer step (see the module docstring).

    Usage per optimizer step::

        terms.start(split=...)                    # split: per-term telemetry / param-space clip this step
        for micro-batch:                          # forward once, then
            terms.backward(twinflow=L_tw, rl=w * L_rl, scale=1 / accum)
        stats = terms.finish()                    # .grad = g_tw + c * g_rl; per-term stats (split only)

    ``rl`` is the weighted RL term (``RlTerm.loss``, the weight already in it).
    Without ``split`` a single backward of ``scale * (L_tw + w * L_rl)`` is done and
    ``finish`` returns no stats. ``rl_clip_norm`` (the RL term's own max norm)
    requires ``split`` on every step.
    """

    model: nn.Module
    rl_clip_norm: float | None = None
    stash: str = "device"
    """Where a split step keeps the RL term's gradient during the TwinFlow backward: ``device`` or ``host``."""
    _params: list[nn.Parameter] = field(init=False, repr=False)
    _split: bool | None = field(default=None, init=False)
    _in_place: bool = field(default=False, init=False)
    _in_place_stats: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _tw: list[torch.Tensor | None] = field(default_factory=list, init=False, repr=False)
    _rl: list[torch.Tensor | None] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rl_clip_norm is not None and not self.rl_clip_norm > 0:
            raise ValueError(f"rl_clip_norm must be > 0 (got {self.rl_clip_norm})")
        if self.stash not in ("device", "host"):
            raise ValueError(f"stash must be 'device' or 'host' (got {self.stash!r})")
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def split(self) -> bool:
        if self._split is None:
            raise RuntimeError("TermGradients.start() was not called for this step")
        return self._split

    def start(self, *, split: bool, clip_in_place: bool = False) -> None:
        if clip_in_place and (split or self.rl_clip_norm is None):
            raise ValueError("clip_in_place is the RL clip of a step without the split (and needs rl_clip_norm)")
        if self.rl_clip_norm is not None and not (split or clip_in_place):
            raise ValueError("parameter-space RL clipping (rl.clip 'param') needs the per-term split or the "
                             "in-place clip on every step")
        if any(p.grad is not None for p in self._params):
            raise RuntimeError("gradients are not empty at the start of a step (zero_grad(set_to_none=True) first)")
        self._split = split
        self._in_place = clip_in_place
        self._in_place_stats = None
        self._tw = [None] * len(self._params)
        self._rl = [None] * len(self._params)

    def _take_grads(self, into: list[torch.Tensor | None], *, host: bool = False) -> None:
        """Move ``.grad`` into a buffer (by reference: no copy on the first micro-batch); with ``host`` the
        local shard is copied to host memory and the device gradient freed."""
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            if host:
                loc = _local(g).detach().to("cpu")
                if into[i] is None:
                    into[i] = loc
                else:
                    into[i].add_(loc)
            elif into[i] is None:
                into[i] = g
            else:
                _local(into[i]).add_(_local(g))
            p.grad = None

    def _device_rl(self, i: int, p: nn.Parameter) -> torch.Tensor | None:
        """The RL term's local gradient of parameter i on the parameter's device."""
        b = self._rl[i]
        if b is None:
            return None
        return b.to(_local(p).device) if self.stash == "host" else _local(b)

    def backward(self, *, twinflow: torch.Tensor, rl: torch.Tensor | None, scale: float = 1.0) -> None:
        """Back-propagate one micro-batch: ``scale * twinflow`` and ``scale * rl``.

        ``rl`` is the weighted RL term (``RlTerm.loss``: ``w * L_rl``, so every RL gradient here, clipped
        or measured, carries the weight); it is skipped when it carries no graph (a zero weight: the RL
        gradient is zero then).
        """
        rl_active = rl is not None and rl.requires_grad
        if self._in_place:
            self._backward_clip_in_place(twinflow=twinflow, rl=rl if rl_active else None, scale=scale)
            return
        if not self.split:
            loss = twinflow + rl if rl_active else twinflow
            (loss * scale).backward()
            return
        sync = getattr(self.model, "set_requires_gradient_sync", None)
        if sync is not None:
            sync(True)  # each term's gradient must land, reduced, in .grad
        if rl_active:
            (rl * scale).backward(retain_graph=True)
            self._take_grads(self._rl, host=self.stash == "host")
        (twinflow * scale).backward()
        self._take_grads(self._tw)

    def _backward_clip_in_place(self, *, twinflow: torch.Tensor, rl: torch.Tensor | None, scale: float) -> None:
        if self._in_place_stats is not None:
            raise RuntimeError("the in-place RL clip takes one micro-batch per step (data.grad_accum 1)")
        sync = getattr(self.model, "set_requires_gradient_sync", None)
        if sync is not None:
            sync(True)  # the RL gradient must land, reduced, in .grad before it is scaled
        if rl is not None:
            (rl * scale).backward(retain_graph=True)
            grads = _grads(self._params)
            rl_sq = global_sums((g, [_sq(_local(g))]) for g in grads)[0] if grads else None
        else:
            grads, rl_sq = [], None
        if rl_sq is None:
            rl_norm = torch.zeros(())
            coef = torch.ones(())
        else:
            rl_norm = rl_sq.sqrt()
            # 1e-6 only keeps the ratio finite for a zero RL gradient (coef clamps to 1 then), as in finish
            coef = torch.clamp(self.rl_clip_norm / (rl_norm + 1e-6), max=1.0)
            for g in grads:
                loc = _local(g)
                loc.mul_(coef.to(loc.device, loc.dtype))
        (twinflow * scale).backward()  # accumulates onto c * g_rl
        self._in_place_stats = {"grad_norm/rl": rl_norm, "grad_norm/rl_clipped": coef * rl_norm,
                                "rl/clip_coef": coef}

    def finish(self) -> dict[str, torch.Tensor]:
        """Write the combined gradient into ``.grad``; per-term stats in split mode, else ``{}``."""
        split, self._split = self.split, None
        if self._in_place:
            stats, self._in_place_stats, self._in_place = self._in_place_stats, None, False
            if stats is None:
                raise RuntimeError("finish() before backward() in a step with the in-place RL clip")
            return stats
        if not split:
            return {}
        tw = self._tw
        pairs = []
        for i, (p, a) in enumerate(zip(self._params, tw)):
            lb = self._device_rl(i, p)
            if a is None and lb is None:
                continue
            ref = a if a is not None else p  # a parameter is laid out like its gradient
            la = _local(a) if a is not None else None
            zero = torch.zeros((), device=_local(ref).device)
            pairs.append((ref, [_sq(la) if la is not None else zero,
                                _sq(lb) if lb is not None else zero,
                                _dot(la, lb) if la is not None and lb is not None else zero]))
        if not pairs:
            raise RuntimeError("no parameter received a gradient in this step")
        tw_sq, rl_sq, cross = global_sums(pairs)
        tw_norm, rl_norm = tw_sq.sqrt(), rl_sq.sqrt()
        if self.rl_clip_norm is not None:
            # 1e-6 only keeps the ratio finite for a zero RL gradient (coef clamps to 1 then)
            coef = torch.clamp(self.rl_clip_norm / (rl_norm + 1e-6), max=1.0)
        else:
            coef = torch.ones_like(rl_norm)
        for i, (p, a) in enumerate(zip(self._params, tw)):
            lb = self._device_rl(i, p)
            if lb is not None:
                lb.mul_(coef.to(lb.device, lb.dtype))
                if a is not None:
                    _local(a).add_(lb)
                elif self.stash == "host" and _is_dtensor(p):
                    a = DTensor.from_local(lb, p.device_mesh, p.placements, run_check=False)
                elif self.stash == "host":
                    a = lb
                else:
                    a = self._rl[i]
            p.grad = a
        self._tw, self._rl = [], []
        total_sq = tw_sq + 2 * coef * cross + coef.square() * rl_sq
        rl_proj = coef * cross + coef.square() * rl_sq
        denom = tw_norm * rl_norm
        zero = torch.zeros_like(tw_sq)
        return {
            "grad_norm/twinflow": tw_norm,
            "grad_norm/rl": rl_norm,
            "grad_norm/rl_clipped": coef * rl_norm,
            "grad_cos/twinflow_rl": torch.where(denom == 0, zero, cross / denom),
            "rl/clip_coef": coef,
            "rl/share": torch.where(total_sq == 0, zero, rl_proj / total_sq),
        }
