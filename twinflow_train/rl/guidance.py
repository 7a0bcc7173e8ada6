"""Latent-space reward guidance ("RL", docs/method.md §5): weight schedules, latent reward gradients, surrogate loss.

The one-step generator output of the e2e rows, ``x_gen = z - F_e2e``, carries the
graph of the main forward pass. The reward ``R(decode(x_gen), prompt)`` is pushed
up through the surrogate

    L_rl = -mean over rows i and latent elements j of sg(g_ij) * x_gen_ij

whose gradient with respect to ``x_gen_i`` is ``-g_i / (B * D)`` (D = latent
elements per row): with ``g = dR/dx`` and no normalisation, the parameter
gradient of ``L_rl`` is the gradient of ``-mean_i R_i`` pulled back through the
generator, divided by D, and the transformer is not run a second time (the
reward gradient is taken on a detached copy). Dividing by D is what makes
``rl.weight`` mean the same at every resolution: the TwinFlow terms are per-row
means (their output gradient is also O(1/(B*D)) per element), so a sum over
elements would make the RL/TwinFlow ratio grow with D (~2e4 between digits'
D = 64 and a 1328^2 Qwen latent). The value of ``L_rl`` itself has no meaning (it
depends on where x_gen is); its gradient does. :meth:`RewardGuidance.term` returns the
weighted term ``w_rl(k) * L_rl``, the one the trainer adds to the TwinFlow loss as it is.

Latent gradient estimators (``rl.estimator``):

- ``exact``: ``g = dR(D(x))/dx`` by autograd through the codec's decoder and the reward. A codec
  with a ``grad_decode`` (the Qwen-Image VAE) decodes through it: the same function and gradient,
  checkpointed per decoder block (``models/qwen_decode.py``); ``rl.decoder_dtype: bf16`` runs that
  decode with a bf16 decoder, an approximation. The small codecs decode with ``decode`` and accept fp32 only.
- ``reencode``: the training report's projection, done right: in fp32,
  ``g = (E(D(x) + s * g_pix) - E(D(x))) / s`` with ``g_pix = dR/dpixels`` at
  ``D(x)`` and ``s = rl.reencode_step``. Subtracting ``E(D(x))`` (not ``x``)
  cancels the codec's round-trip residual; dividing by ``s`` makes it a
  directional finite difference, ``g -> J_E g_pix`` as ``s -> 0``, so the pixel
  step and the loss weight are separate knobs. It equals the exact gradient
  ``J_D^T g_pix`` when ``J_E = c * J_D^T`` (e.g. an orthogonal linear codec), up
  to the scale c that RMS normalisation removes; in general it is a different
  direction. ``codec.encode`` must be deterministic (a posterior mean, not a sample).

Normalisation (``rl.normalize``): ``none`` (default) keeps the reward's own
gradient, which fades as the reward saturates; ``rms`` rescales each row of ``g``
to unit RMS, so the push keeps full strength however saturated the reward is
(it never fades: with a saturating reward this is itself a cause of blow-ups;
kept to reproduce the training report).

Output-space clipping (``rl.clip: output``): per row i, the RL term's gradient on
the generator output, ``w * g_i / (B * D)``, is scaled by
``min(1, tau * RMS(r_i) / RMS(w * g_i / (B * D)))`` where ``r_i`` is the
rectification term's actual gradient on the same output row
(``TwinFlowOutput.rect_grad``: ``d(rect_weight * L_rect)/dF_i``, which under the
Barron loss is ~``2 * rect_weight * dV_i / (RMS(dV_i) * B * D)``: its size does not
follow dV), ``tau = rl.clip_tau``. The RL correction of a row therefore never
pushes harder than ``tau`` times what rectification pushes on that row.

Weight schedule ``w_rl(k)`` (``rl.schedule``; 0 whenever ``rl.enabled`` is false):
hard ``w * [k >= warmup]``; linear ``w * clip((k - warmup) / ramp, 0, 1)``;
sigmoid ``w * sigmoid((k - center) / width)``, whose width -> 0 limit is the hard
switch at ``center`` (at ``k == center`` exactly it is ``w / 2``). ``rl.start``
cuts any of them: the weight is exactly 0 for ``k < start`` (a sigmoid is never
exactly 0 on its own, so its RL term would act, however faintly, from step 1).
``k`` is the trainer's optimizer step number (the same one the renoise schedules get).

While ``w_rl(k) == 0`` the trainer's step is the step of the same run without RL,
bit for bit (``run/trainer.py``, ``train_step``): one backward of the TwinFlow loss,
no per-term split and no RL clip; only the reward of the generator output is
computed, without a gradient, for telemetry. ``run/fork.py`` relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Literal, Protocol

import torch

from ..config import ConfigError, RlConfig
from ..models.base import Cond
from .rewards import RewardModel
from .schedule import rl_weight

__all__ = ["Codec", "RlTerm", "RewardGuidance", "rl_weight", "exact_latent_grad", "grad_decoder", "reencode_latent_grad",
           "rms_normalize", "output_clip_scale", "surrogate_loss", "surrogate_output_grad"]


class Codec(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...


# --------------------------------------------------------------------------- latent gradients


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half precisions, else the input's own (float64 stays float64 for checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def exact_latent_grad(*, x: torch.Tensor, cond: Cond, codec: Codec, reward: RewardModel,
                      decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, R)``: ``g_i = dR_i/dx_i`` through decoder and reward on a detached copy of ``x``, and ``R [B]``.

    Only ``x`` is differentiated (``autograd.grad`` with ``inputs=x``), so no
    ``.grad`` of the codec, the reward model or the generator is touched.
    ``decode`` replaces ``codec.decode`` (the checkpointed decode, :func:`grad_decoder`).
    """
    xd = x.detach().to(_work_dtype(x)).requires_grad_(True)
    with torch.enable_grad():
        r = reward((decode or codec.decode)(xd), cond)
        _check_reward(r, x.shape[0])
        (g,) = torch.autograd.grad(r.sum(), xd)
    return g, r.detach()


def grad_decoder(codec: Codec, decoder_dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode the exact estimator differentiates: the codec's ``grad_decode`` where it has one (in
    ``decoder_dtype``), else ``decode`` (fp32 only: the small codecs have no other precision)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if decoder_dtype not in dtypes:
        raise ConfigError(f"rl.decoder_dtype: unknown value {decoder_dtype!r}; valid: {sorted(dtypes)}")
    grad_decode = getattr(codec, "grad_decode", None)
    if grad_decode is None:
        if decoder_dtype != "fp32":
            raise ConfigError(f"rl.decoder_dtype {decoder_dtype!r} needs a codec with a reduced-precision decoder "
                              f"(the Qwen-Image VAE); {type(codec).__name__} decodes in fp32 only")
        return codec.decode
    dtype = dtypes[decoder_dtype]
    return lambda latents: grad_decode(latents, dtype=dtype)


def reencode_latent_grad(*, x: torch.Tensor, cond: Cond, codec: Codec, reward: RewardModel,
                         step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, R)`` with ``g = (E(D(x) + step * dR/dpix) - E(D(x))) / step`` in fp32 (module docstring)."""
    if not step > 0:
        raise ConfigError(f"rl.reencode_step must be > 0 (got {step})")
    dtype = _work_dtype(x)
    with torch.no_grad():
        pix0 = codec.decode(x.detach().to(dtype)).to(dtype)
    pix = pix0.clone().requires_grad_(True)
    with torch.enable_grad():
        r = reward(pix, cond)
        _check_reward(r, x.shape[0])
        (g_pix,) = torch.autograd.grad(r.sum(), pix)
    with torch.no_grad():
        both = codec.encode(torch.cat([pix0 + step * g_pix.to(dtype), pix0])).to(dtype)
        moved, base = both.chunk(2)
        g = (moved - base) / step
    return g, r.detach()


def _check_reward(r: torch.Tensor, n: int) -> None:
    if r.shape != (n,):
        raise ValueError(f"reward model returned shape {list(r.shape)}; expected one reward per sample [{n}]")


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).pow(2).mean(dim=1).sqrt()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def rms_normalize(g: torch.Tensor) -> torch.Tensor:
    """``g_i / RMS(g_i)`` per sample. An all-zero row stays zero; NaN/inf propagate (they are acted on upstream)."""
    rms = _rms(g)
    # tiny only guards an exactly-zero row (0/0); any real gradient has rms far above it
    return g / _col(rms.clamp_min(torch.finfo(rms.dtype).tiny), g)


def output_clip_scale(*, rl_grad: torch.Tensor, rect_grad: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row ``min(1, tau * RMS(rect_grad_i) / RMS(rl_grad_i))`` (1 where rl_grad_i is exactly zero).

    Both are gradients of the total loss on the same generator output rows: the
    RL term's (weight included) and the rectification term's.
    """
    if rl_grad.shape != rect_grad.shape:
        raise ValueError(f"output clip: the RL gradient {list(rl_grad.shape)} and the rectification gradient "
                         f"{list(rect_grad.shape)} differ in shape")
    rd, rv = _rms(rl_grad), _rms(rect_grad.to(rl_grad.dtype))
    ratio = tau * rv / torch.where(rd == 0, torch.ones_like(rd), rd)
    return torch.where(rd == 0, torch.ones_like(rd), ratio.clamp(max=1.0))


def surrogate_output_grad(*, direction: torch.Tensor, weight: float) -> torch.Tensor:
    """The gradient of ``weight * surrogate_loss`` on ``x_gen``: ``-weight * direction / (B * D)``."""
    per_row = direction[0].numel() if direction.shape[0] else 1
    return -weight * direction / (direction.shape[0] * per_row)


def surrogate_loss(*, x_gen: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``-mean over rows and elements of sg(direction) * x_gen`` in fp32 (at least).

    Its gradient w.r.t. x_gen_i is ``-direction_i / (B * D)``, D = elements per row (module docstring).
    """
    dtype = torch.promote_types(x_gen.dtype, torch.float32)
    return -(direction.detach().to(dtype) * x_gen.to(dtype)).mean()


# --------------------------------------------------------------------------- the trainer's entry point


@dataclass
class RlTerm:
    """One micro-batch's RL term."""

    loss: torch.Tensor
    """The weighted scalar surrogate ``weight * L_rl``, the term the trainer adds to the TwinFlow loss as it is
    (its gradient is the RL gradient the clips measure); a constant zero without graph when the weight is 0.
    ``stats["loss/rl"]`` holds the unweighted surrogate's value."""
    weight: float
    """``w_rl(step)``, already in ``loss``: a number for the record (``rl/weight``)."""
    reward: torch.Tensor
    """Per-sample reward ``[B]`` of the generator output, detached."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Telemetry, 0-dim detached tensors (call ``.item()`` on log steps only)."""


class RewardGuidance:
    """The RL term of the training step (docs/method.md §5), configured once from ``rl``.

    ``term(x_gen=..., cond=..., rect_grad=..., step=...)`` returns an :class:`RlTerm`, weight applied.
    Stats: ``loss/rl`` (the unweighted surrogate), ``rl/weight``, ``rl/reward`` (batch mean),
    ``rl/grad_rms`` (mean per-sample RMS of the raw latent gradient) and, with
    output clipping, ``rl/clip_frac`` (share of rows scaled down) and
    ``rl/clip_scale`` (mean factor). While the weight is 0 (before warm-up) only
    the reward is computed, without a gradient: ``loss`` is a constant zero and
    ``rl/grad_rms`` is absent.
    """

    def __init__(self, cfg: RlConfig, *, codec: Codec, reward: RewardModel | None):
        if reward is None:
            raise ConfigError("rl.reward: reward guidance needs a reward model (got none)")
        self.cfg = cfg
        self.codec = codec
        self.reward = reward
        self.estimator = cfg.estimator
        self.normalize = cfg.normalize
        self.clip = cfg.clip
        self._grad_decode = grad_decoder(codec, cfg.decoder_dtype) if cfg.estimator == "exact" else None

    @property
    def param_clip_norm(self) -> float | None:
        """The RL term's own max gradient norm when ``rl.clip`` is ``param`` (for ``grads.TermGradients``)."""
        return self.cfg.clip_norm if self.clip == "param" else None

    def weight(self, step: int) -> float:
        return rl_weight(step, self.cfg)

    def latent_grad(self, *, x: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, R)`` from the configured estimator, before normalisation."""
        if self.estimator == "exact":
            return exact_latent_grad(x=x, cond=cond, codec=self.codec, reward=self.reward, decode=self._grad_decode)
        return reencode_latent_grad(x=x, cond=cond, codec=self.codec, reward=self.reward,
                                    step=self.cfg.reencode_step)

    def term(self, *, x_gen: torch.Tensor, cond: Cond, rect_grad: torch.Tensor | None = None, step: int) -> RlTerm:
        w = self.weight(step)
        if w == 0.0:
            with torch.no_grad():
                r = self.reward(self.codec.decode(x_gen.detach().to(_work_dtype(x_gen))), cond)
            _check_reward(r, x_gen.shape[0])
            zero = torch.zeros((), device=x_gen.device)
            return RlTerm(loss=zero, weight=0.0, reward=r.detach(),
                          stats={"loss/rl": zero, "rl/weight": zero.new_tensor(0.0), "rl/reward": r.detach().mean()})
        g, r = self.latent_grad(x=x_gen, cond=cond)
        stats = {"rl/reward": r.mean(), "rl/grad_rms": _rms(g).mean().detach()}
        if self.normalize == "rms":
            g = rms_normalize(g)
        if self.clip == "output":
            if rect_grad is None:
                raise ValueError("rl.clip 'output' needs rect_grad, the rectification term's gradient on the x_gen rows")
            scale = output_clip_scale(rl_grad=surrogate_output_grad(direction=g, weight=w), rect_grad=rect_grad,
                                      tau=self.cfg.clip_tau)
            g = g * _col(scale, g)
            stats["rl/clip_frac"] = (scale < 1).float().mean()
            stats["rl/clip_scale"] = scale.mean()
        loss = surrogate_loss(x_gen=x_gen, direction=g)
        stats["loss/rl"] = loss.detach()
        stats["rl/weight"] = torch.tensor(w)
        return RlTerm(loss=w * loss, weight=w, reward=r, stats=stats)

    # stateless: the weight is a pure function of the step; kept for a uniform checkpoint interface
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"RewardGuidance has no state; got keys {sorted(state)}")
