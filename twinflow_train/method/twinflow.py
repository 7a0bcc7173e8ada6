"""The TwinFlow objective (docs/method.md §2), batch-partitioned as at scale, and the tutorial layout.

Conventions (docs/method.md §1): ``x_t = t*z + (1-t)*x``, ``v = z - x``, t = 1 is noise; the
network is ``F(x_t, t, tt, c)``; negative time selects the twin (fake) branch.

Partitioned layout (default). A batch of B rows is split into four contiguous
groups by ``group_ratios`` (sizes by largest remainder, so they sum to B):

==========  =======================  ==================================================
group       times                    row
==========  =======================  ==================================================
e2e         t = 1, tt = 0            x_t = z: one-step generation
mul         tt = t*(1 - gap*u)       real x: ~ flow matching
any         tt = t*(1 - u)           real x: any-step consistency
adv         t = tt = -s              fresh no-grad one-step fake: fake-branch matching
==========  =======================  ==================================================

Non-adv rows are trained toward the RCGM target built from the target network T
on the CFG-enhanced velocity; adv rows toward ``z - x_fake``. The e2e rows'
one-step output is rectified with the velocity difference of the twin branches.
One forward+backward on B rows; everything else is no-grad.

Tutorial layout: the terms of the paper's tutorial training step, each on every
row (RCGM, real velocity, one-step RCGM, fake-branch matching, rectification):
4 forwards with grad and ``4 + 2N`` without, per row.

All randomness comes from the ``generator`` passed to ``loss`` (times, noise,
fakes); the global RNG is never read or restored.

FSDP2 note: every rank must run the same sequence of forward calls (each one
all-gathers parameters). Which forwards run depends on the config and the group
sizes only; rows selected by random times (CFG range, RCGM roll-out) may be an
empty set on one rank, in which case one candidate row is evaluated and its
result discarded, so the call still happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch

from ..config import MethodConfig, literal_values
from ..models.base import Cond, FlowModel, cond_cat, cond_len, cond_rows
from .sampling import x_hat
from .timesamplers import TIME_KEYS, TimeSampler

LOSSES: tuple[str, ...] = literal_values(MethodConfig, "loss")
GROUPS: tuple[str, ...] = ("e2e", "mul", "any", "adv")


# --------------------------------------------------------------------------- small math


def group_sizes(*, batch: int, ratios: Sequence[float]) -> list[int]:
    """Rows of the e2e, mul, any and adv groups: largest-remainder apportionment of ``batch``.

    Always sums to ``batch``; a zero ratio gives an empty group, and a small positive
    ratio may round to zero rows at a small batch. Ties go to the earlier group.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1 (got {batch})")
    if len(ratios) != len(GROUPS) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"group_ratios must be {len(GROUPS)} values >= 0 with a positive sum (got {list(ratios)})")
    total = float(sum(ratios))
    quotas = [batch * r / total for r in ratios]
    sizes = [math.floor(q) for q in quotas]
    left = batch - sum(sizes)
    order = sorted(range(len(GROUPS)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[:left]:
        sizes[i] += 1
    return sizes


def check_group_rows(*, rows: int, ratios: Sequence[float], where: str = "per micro-batch") -> list[int]:
    """``group_sizes(rows, ratios)``, or a ValueError when a group with a positive ratio gets no row.

    A group that rounds to zero rows would silently drop its term (e.g. no e2e rows: no
    one-step generation, no rectification, no RL) on that rank.
    """
    sizes = group_sizes(batch=rows, ratios=ratios)
    empty = [g for g, r, n in zip(GROUPS, ratios, sizes) if r > 0 and n == 0]
    if empty:
        raise ValueError(
            f"method.group_ratios {list(ratios)}: group(s) {', '.join(empty)} get 0 of the {rows} rows {where} "
            f"(sizes {dict(zip(GROUPS, sizes))}); every group with a positive ratio needs >= 1 row: raise "
            f"data.batch_size, or lower data.grad_accum or the number of ranks")
    return sizes


def check_rows_per_rank(*, batch_size: int, grad_accum: int, world: int, ratios: Sequence[float]) -> list[int]:
    """Group sizes of one rank's micro-batch (``batch_size / (grad_accum * world)`` rows), checked as above."""
    count = grad_accum * world
    if batch_size % count:
        raise ValueError(f"data.batch_size ({batch_size}) must divide into grad_accum x ranks = "
                         f"{grad_accum} x {world} micro-batches")
    return check_group_rows(rows=batch_size // count, ratios=ratios,
                            where=f"per rank per micro-batch (data.batch_size {batch_size} / "
                                  f"(grad_accum {grad_accum} x {world} ranks))")


def tan_weight(t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
    """``w = tan((1 - (|t| - |tt|)) * pi / 2.5) + 1``: 1 at a full jump (t=1, tt=0), ~4.08 at tt = t."""
    return torch.tan((1.0 - (t.abs() - tt.abs())) * (math.pi / 2.5)) + 1.0


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, *, kind: Literal["l2", "barron"],
                    c: float = 1e-3) -> torch.Tensor:
    """rho per row, in float32: L2 ``m = mean((pred-target)^2)``, or Barron (alpha = 1, scale c)
    ``m * sg((1 + m/c^2)^(-1/2)) / c``, which is ~ the per-row RMSE when m >> c^2."""
    m = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if kind == "l2":
        return m
    if kind == "barron":
        return m * torch.rsqrt(1.0 + m.detach() / (c * c)) / c
    raise ValueError(f"method.loss: unknown loss {kind!r}; valid: {', '.join(map(repr, LOSSES))}")


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class _Rows:
    """Rows forwarded this call, with and without grad (the benchmark's cost measure)."""

    grad: int = 0
    no_grad: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"grad": self.grad, "no_grad": self.no_grad}


def _no_grad_forward(net: FlowModel, x: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, cond: Cond,
                     rows: _Rows | None, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        out = net(x.to(dtype), t, tt, cond).float()
    if rows is not None:
        rows.no_grad += x.shape[0]
    return out


def _run_rows(mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Indices where ``mask`` holds among ``candidates``; one candidate if none (see the FSDP2 note)."""
    # a host-device sync (boolean indexing); twice per step, and it saves whole forwards on rows that need none
    idx = candidates[mask[candidates]]
    return idx if idx.numel() else candidates[:1]


# --------------------------------------------------------------------------- targets


def enhanced_velocity(*, target: FlowModel, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: Cond,
                      ratio: float, lo: float, hi: float, candidates: torch.Tensor | None = None,
                      rows: _Rows | None = None) -> torch.Tensor:
    """CFG-enhanced target ``v + ratio*(T(x_t,t,t,c) - T(x_t,t,t,null))`` on rows with lo < t < hi.

    The range is an open interval; other rows keep ``v``. The conditional and null
    evaluations are one no-grad forward of 2m rows. ``candidates`` restricts which
    rows may be enhanced (default: all).
    """
    v = v.float()
    if ratio == 0.0:
        return v
    n = x_t.shape[0]
    if candidates is None:
        candidates = torch.arange(n, device=x_t.device)
    if candidates.numel() == 0:
        return v
    inside = (t > lo) & (t < hi)
    idx = _run_rows(inside, candidates)
    xs, ts, cs = x_t[idx], t[idx], cond_rows(cond, idx)
    both = cond_cat([cs, target.null_cond(cs)])
    out = _no_grad_forward(target, torch.cat([xs, xs]), torch.cat([ts, ts]), torch.cat([ts, ts]), both,
                           rows, x_t.dtype)
    with_c, without_c = out.chunk(2)
    keep = _col(inside[idx], v)
    out_v = v.clone()
    out_v[idx] = v[idx] + keep * (ratio * (with_c - without_c))
    return out_v


def rcgm_rollout(*, target: FlowModel, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, v_enh: torch.Tensor,
                 cond: Cond, order: int, delta_t: float, rows: _Rows | None = None) -> torch.Tensor:
    """``P = sum_i (s_i - s_{i+1}) T(x_i, s_i, s_{i+1})``: N Euler sub-steps of T from
    ``t_m = max(t - D, tt)`` to tt, starting at ``x_m = x_t - D*v_enh`` (no grad, float32)."""
    t_m = torch.maximum(t - delta_t, tt)
    x = x_t.float() - delta_t * v_enh
    P = torch.zeros_like(x)
    for i in range(order):
        s_i = t_m * (1.0 - i / order) + tt * (i / order)
        s_n = t_m * (1.0 - (i + 1) / order) + tt * ((i + 1) / order)
        out = _no_grad_forward(target, x, s_i, s_n, cond, rows, x_t.dtype)
        step = _col(s_i - s_n, out) * out
        P = P + step
        x = x - step
    return P


def rcgm_from_rollout(*, F: torch.Tensor, P: torch.Tensor, v_enh: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                      delta_t: float, clamp: float) -> torch.Tensor:
    """``T_rcgm = sg(F) - clamp(r)``, ``r = ((t-tt)F - P)/D - v_enh`` where t >= tt + D, else ``F - v_enh``."""
    F = F.detach().float()
    roll = _col(t >= tt + delta_t, F).bool()
    r_roll = (_col(t - tt, F) * F - P) / delta_t - v_enh
    r = torch.where(roll, r_roll, F - v_enh)
    return F - r.clamp(-clamp, clamp)


def rcgm_target(*, target: FlowModel, F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                cond: Cond, v_enh: torch.Tensor, order: int, delta_t: float, clamp: float,
                candidates: torch.Tensor | None = None, rows: _Rows | None = None) -> torch.Tensor:
    """The RCGM target of docs/method.md §2.2 for every row (roll-outs only where t >= tt + D)."""
    P = _rollout_where_needed(target=target, x_t=x_t, t=t, tt=tt, v_enh=v_enh.float(), cond=cond, order=order,
                              delta_t=delta_t, candidates=candidates, rows=rows)
    return rcgm_from_rollout(F=F, P=P, v_enh=v_enh.float(), t=t, tt=tt, delta_t=delta_t, clamp=clamp)


def _rollout_where_needed(*, target: FlowModel, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor,
                          v_enh: torch.Tensor, cond: Cond, order: int, delta_t: float,
                          candidates: torch.Tensor | None, rows: _Rows | None) -> torch.Tensor:
    """P on the rows that need it (t >= tt + D), zeros elsewhere (their residual does not use P)."""
    n = x_t.shape[0]
    if candidates is None:
        candidates = torch.arange(n, device=x_t.device)
    P = torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
    if candidates.numel() == 0:
        return P
    roll = t >= tt + delta_t
    idx = _run_rows(roll, candidates)
    P_idx = rcgm_rollout(target=target, x_t=x_t[idx], t=t[idx], tt=tt[idx], v_enh=v_enh[idx],
                         cond=cond_rows(cond, idx), order=order, delta_t=delta_t, rows=rows)
    P[idx] = P_idx * _col(roll[idx], P_idx)
    return P


def rectify_delta(*, model: FlowModel, x_gen: torch.Tensor, cond: Cond, s: torch.Tensor, noise: torch.Tensor,
                  clamp: float, rows: _Rows | None = None) -> torch.Tensor:
    """``dV = clamp(F(y,-s,-s) - F(y,s,s))`` at ``y = s*z' + (1-s)*sg(x_gen)``, one no-grad 2n forward."""
    y = _col(s, x_gen) * noise + (1.0 - _col(s, x_gen)) * x_gen.detach().float()
    both = cond_cat([cond, cond])
    tv = torch.cat([-s, s])
    out = _no_grad_forward(model, torch.cat([y, y]), tv, tv, both, rows, x_gen.dtype)
    fake, real = out.chunk(2)
    return (fake - real).clamp(-clamp, clamp)


# --------------------------------------------------------------------------- the method


@dataclass
class TwinFlowOutput:
    loss: torch.Tensor
    """loss_main + rect_weight * loss_rect (scalar, carries grad)."""
    loss_main: torch.Tensor
    """Weighted per-sample loss over the batch (scalar)."""
    loss_rect: torch.Tensor
    """Rectification loss on the e2e rows (scalar; 0 when there are none)."""
    x_gen: torch.Tensor | None
    """One-step output ``z - F_e2e`` of the e2e rows, carrying grad; None without e2e rows."""
    cond_gen: Cond | None
    """Conditions of the x_gen rows."""
    rect_grad: torch.Tensor | None = None
    """``d(rect_weight * loss_rect)/dF`` on the x_gen rows (no grad, shape of x_gen): the rectification
    term's actual push on the generator output, the yardstick of output-space RL clipping."""
    forward_rows: dict[str, int] = field(default_factory=dict)
    """Rows forwarded this call: ``grad`` and ``no_grad``."""
    group_sizes: dict[str, int] = field(default_factory=dict)
    """Rows per group (partitioned) or the batch size under every term (tutorial)."""


def _rand(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float32, device=generator.device).to(device)


def _randn(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    z = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device=generator.device)
    return z.to(device=like.device, dtype=torch.float32)


def _to_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class TwinFlow:
    """TwinFlow training objective; ``loss(...)`` does every forward of one training step."""

    def __init__(self, cfg: MethodConfig, *, time_samplers: Mapping[str, TimeSampler], with_rect_grad: bool = True):
        """``with_rect_grad``: return the rectification term's output gradient (``TwinFlowOutput.rect_grad``),
        which only the output-space RL clip reads; the trainer turns it off otherwise (an autograd pass a step)."""
        missing = [k for k in TIME_KEYS if k not in time_samplers]
        if missing:
            raise ValueError(f"time_samplers: missing {missing}; need {', '.join(map(repr, TIME_KEYS))}")
        self.cfg = cfg
        self.with_rect_grad = with_rect_grad
        self.layout = cfg.layout
        self.loss_kind = cfg.loss
        self.time_samplers = dict(time_samplers)
        self.lo, self.hi = (float(v) for v in cfg.enhanced_range)

    # ---------------------------------------------------------------- shared pieces

    def _rho(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(pred, target, kind=self.loss_kind, c=self.cfg.barron_c)

    def _enhanced(self, target: FlowModel, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: Cond,
                  candidates: torch.Tensor, rows: _Rows) -> torch.Tensor:
        return enhanced_velocity(target=target, x_t=x_t, t=t, v=v, cond=cond, ratio=self.cfg.enhanced_ratio,
                                 lo=self.lo, hi=self.hi, candidates=candidates, rows=rows)

    def _roller(self, model: FlowModel, target: FlowModel) -> FlowModel:
        """The network of the RCGM roll-out (docs/method.md §2.2): T, except with a frozen base-model target, where the
        student rolls out (under no_grad) and the frozen copy serves only the CFG pair. A base model never
        trained at tt != t sees a time embedding it never learned there, so it cannot roll out."""
        return model if self.cfg.target == "frozen" else target

    def _rollout(self, target: FlowModel, x_t: torch.Tensor, t: torch.Tensor, tt: torch.Tensor, v_enh: torch.Tensor,
                 cond: Cond, candidates: torch.Tensor, rows: _Rows) -> torch.Tensor:
        return _rollout_where_needed(target=target, x_t=x_t, t=t, tt=tt, v_enh=v_enh, cond=cond,
                                     order=self.cfg.estimate_order, delta_t=self.cfg.delta_t,
                                     candidates=candidates, rows=rows)

    def _rcgm(self, F: torch.Tensor, P: torch.Tensor, v_enh: torch.Tensor, t: torch.Tensor,
              tt: torch.Tensor) -> torch.Tensor:
        return rcgm_from_rollout(F=F, P=P, v_enh=v_enh, t=t, tt=tt, delta_t=self.cfg.delta_t,
                                 clamp=self.cfg.target_clamp)

    def _rectify(self, model: FlowModel, F_gen: torch.Tensor, x_gen: torch.Tensor, cond: Cond,
                 generator: torch.Generator, step: int,
                 rows: _Rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss_rect, rect_grad)``; rect_grad = ``d(rect_weight * loss_rect)/dF_gen`` (no graph)."""
        n = x_gen.shape[0]
        s = self.time_samplers["rect"].sample(n, generator=generator, step=step).to(x_gen.device)
        noise = _randn(x_gen.shape, generator, x_gen)
        dv = rectify_delta(model=model, x_gen=x_gen, cond=cond, s=s, noise=noise, clamp=self.cfg.target_clamp,
                           rows=rows)
        loss_rect = self._rho(F_gen, (F_gen.detach().float() - dv)).mean()
        return loss_rect, (self._rect_output_grad(F_gen, dv) if self.with_rect_grad else None)

    def _rect_output_grad(self, F_gen: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        """The rectification term's actual gradient on the generator output (the output-space RL clip's yardstick).

        Autograd on a detached copy, so it is exact for either loss kind; the ops are elementwise on the
        e2e rows only (no network call).
        """
        with torch.enable_grad():
            f = F_gen.detach().float().requires_grad_(True)
            loss = self.cfg.rect_weight * self._rho(f, f.detach() - dv).mean()
            (grad,) = torch.autograd.grad(loss, f)
        return grad

    # ---------------------------------------------------------------- entry point

    def loss(self, *, model: FlowModel, target: FlowModel, x: torch.Tensor, cond: Cond,
             generator: torch.Generator, step: int) -> TwinFlowOutput:
        """One training step's losses for batch ``x`` ([B, ...]) with conditions ``cond``."""
        if x.dim() < 2 or x.shape[0] < 1:
            raise ValueError(f"x must be a batch [B, ...] with B >= 1 (got shape {tuple(x.shape)})")
        if cond_len(cond) != x.shape[0]:
            raise ValueError(f"cond has {cond_len(cond)} rows for a batch of {x.shape[0]}")
        if self.layout == "partitioned":
            return self._partitioned(model, target, x, cond, generator, step)
        return self._tutorial(model, target, x, cond, generator, step)

    # ---------------------------------------------------------------- partitioned (docs/method.md §2)

    def _partitioned(self, model: FlowModel, target: FlowModel, x: torch.Tensor, cond: Cond,
                     generator: torch.Generator, step: int) -> TwinFlowOutput:
        cfg, dev, B = self.cfg, x.device, x.shape[0]
        n_e2e, n_mul, n_any, n_adv = check_group_rows(rows=B, ratios=cfg.group_ratios)
        n_real = B - n_adv  # e2e + mul + any: rows on real data
        rows = _Rows()

        # times: main t for mul/any, u for their target times, s for adv (all from `generator`)
        t_main = self.time_samplers["main"].sample(n_mul + n_any, generator=generator, step=step).to(dev)
        u = _rand(n_mul + n_any, generator, dev)
        s_adv = self.time_samplers["adv"].sample(n_adv, generator=generator, step=step).to(dev)
        t_mul, t_any = t_main[:n_mul], t_main[n_mul:]
        u_mul, u_any = u[:n_mul], u[n_mul:]
        one = torch.ones(n_e2e, device=dev)
        t = torch.cat([one, t_mul, t_any, -s_adv])
        tt = torch.cat([one * 0.0, t_mul * (1.0 - cfg.mul_gap * u_mul), t_any * (1.0 - u_any), -s_adv])

        z = _randn(x.shape, generator, x)
        data = x.float()
        if n_adv:
            # fresh one-step fakes of the student (no grad) replace the adv rows' data
            z1 = _randn((n_adv, *x.shape[1:]), generator, x)
            c_adv = cond_rows(cond, slice(n_real, B))
            F1 = _no_grad_forward(model, z1, torch.ones(n_adv, device=dev), torch.zeros(n_adv, device=dev),
                                  c_adv, rows, x.dtype)
            data = torch.cat([data[:n_real], x_hat(z1, 1.0, F1)])
        x_t = _col(t.abs(), z) * z + (1.0 - _col(t.abs(), z)) * data
        v = z - data

        # targets of the real rows (no grad, target network T) before the grad forward, to keep peak memory low
        real = torch.arange(n_real, device=dev)
        # CFG candidates: mul and any rows; e2e rows have t = 1, never inside the open range (hi <= 1)
        cfg_rows = torch.arange(n_e2e, n_real, device=dev)
        v_enh = self._enhanced(target, x_t, t, v, cond, cfg_rows, rows)
        P = (self._rollout(self._roller(model, target), x_t, t, tt, v_enh, cond, real, rows) if n_real
             else torch.zeros_like(v))

        # the one forward with grad, on all B rows
        F = model(x_t.to(x.dtype), t, tt, cond)
        rows.grad += B
        goal = v_enh.clone()
        if n_real:
            goal[:n_real] = self._rcgm(F[:n_real], P[:n_real], v_enh[:n_real], t[:n_real], tt[:n_real])
        w = tan_weight(t, tt)
        w[n_real:] = 1.0
        loss_main = (w * self._rho(F, goal)).mean()

        x_gen = cond_gen = rect_grad = None
        loss_rect = torch.zeros((), device=dev)
        if n_e2e:
            F_gen = F[:n_e2e]
            x_gen = x_hat(x_t[:n_e2e].to(F.dtype), 1.0, F_gen)
            cond_gen = cond_rows(cond, slice(0, n_e2e))
            loss_rect, rect_grad = self._rectify(model, F_gen, x_gen, cond_gen, generator, step, rows)
            rect_grad = _to_dtype(rect_grad, x_gen.dtype)
        loss = loss_main + cfg.rect_weight * loss_rect
        return TwinFlowOutput(loss=loss, loss_main=loss_main, loss_rect=loss_rect, x_gen=x_gen, cond_gen=cond_gen,
                              rect_grad=rect_grad, forward_rows=rows.as_dict(),
                              group_sizes=dict(zip(GROUPS, (n_e2e, n_mul, n_any, n_adv))))

    # ---------------------------------------------------------------- tutorial layout

    def _tutorial(self, model: FlowModel, target: FlowModel, x: torch.Tensor, cond: Cond,
                  generator: torch.Generator, step: int) -> TwinFlowOutput:
        """Every term on every row: RCGM at (t, tt), real velocity at (t, t), one-step RCGM at (1, 0),
        fake-branch matching at (-s, -s) on the detached one-step output, and rectification."""
        cfg, dev, B = self.cfg, x.device, x.shape[0]
        rows = _Rows()
        t = self.time_samplers["main"].sample(B, generator=generator, step=step).to(dev)
        u = _rand(B, generator, dev)
        tt = t * (1.0 - u)
        z = _randn(x.shape, generator, x)
        s_adv = self.time_samplers["adv"].sample(B, generator=generator, step=step).to(dev)
        z_adv = _randn(x.shape, generator, x)
        data = x.float()
        x_t = _col(t, z) * z + (1.0 - _col(t, z)) * data
        v = z - data
        every = torch.arange(B, device=dev)
        ones, zeros = torch.ones(B, device=dev), torch.zeros(B, device=dev)

        # no-grad targets first (T): CFG at (t, t), roll-outs for (t, tt) and for the one-step jump (1, 0)
        v_enh = self._enhanced(target, x_t, t, v, cond, every, rows)
        roller = self._roller(model, target)
        P = self._rollout(roller, x_t, t, tt, v_enh, cond, every, rows)
        v_gen = v  # the jump starts at t = 1, outside every open enhanced range (hi <= 1): no CFG term
        P_gen = self._rollout(roller, z, ones, zeros, v_gen, cond, every, rows)

        # 1. RCGM at (t, tt)
        F_any = model(x_t.to(x.dtype), t, tt, cond)
        loss_any = (tan_weight(t, tt) * self._rho(F_any, self._rcgm(F_any, P, v_enh, t, tt))).mean()
        # 2. real velocity at (t, t)
        F_real = model(x_t.to(x.dtype), t, t, cond)
        loss_real = (tan_weight(t, t) * self._rho(F_real, v_enh)).mean()
        # 3. one-step generation at (1, 0), RCGM target
        F_gen = model(z.to(x.dtype), ones, zeros, cond)
        loss_gen = (tan_weight(ones, zeros) * self._rho(F_gen, self._rcgm(F_gen, P_gen, v_gen, ones, zeros))).mean()
        x_gen = x_hat(z.to(F_gen.dtype), 1.0, F_gen)
        # 4. fake branch at (-s, -s) on the detached one-step output (weight 1, as on adv rows)
        fake = x_gen.detach().float()
        y = _col(s_adv, z_adv) * z_adv + (1.0 - _col(s_adv, z_adv)) * fake
        F_adv = model(y.to(x.dtype), -s_adv, -s_adv, cond)
        loss_adv = self._rho(F_adv, z_adv - fake).mean()
        rows.grad += 4 * B

        loss_rect, rect_grad = self._rectify(model, F_gen, x_gen, cond, generator, step, rows)
        loss_main = loss_any + loss_real + loss_gen + loss_adv
        loss = loss_main + cfg.rect_weight * loss_rect
        return TwinFlowOutput(loss=loss, loss_main=loss_main, loss_rect=loss_rect, x_gen=x_gen, cond_gen=cond,
                              rect_grad=_to_dtype(rect_grad, x_gen.dtype), forward_rows=rows.as_dict(),
                              group_sizes={k: B for k in GROUPS})
