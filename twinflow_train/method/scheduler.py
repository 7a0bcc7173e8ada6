"""A diffusers scheduler for the distilled student: the UCGM few-step update (docs/method.md §3).

Grid: ``u = linspace(g0, 1 - g1, S)`` (``linspace(g0, 1, S + 1)`` without its last point
when ``g1 = 0``), warped by Kumaraswamy ``(1 - (1 - u^a)^b)^c``, ``sigma = [1 - u..., 0]``.
Step ``i`` with model output ``F = F(x, sigma_i, tt)`` (``F ~ z - x``)::

    x_hat = x - sigma_i * F,   z_hat = x + (1 - sigma_i) * F
    x'    = (1 - s') * x_hat + s' * (sqrt(1 - r) * z_hat + sqrt(r) * eps),   s' = sigma_{i+1}

with stochastic ratio ``r`` and fresh noise ``eps``; the last step returns ``x_hat``.

Use with a stock ``QwenImagePipeline``: the pipeline computes its own default sigma list
and passes it to ``set_timesteps``; with ``sigma_source="ucgm"`` (default) only its length
(the step count) is used and the grid comes from this config. The pipeline calls the
transformer without a target time, so the exported transformer's ``default_target_time``
supplies it (``zero`` for ``tt_mode="few"``, ``same`` for ``"mul"``); ``"any"`` needs a
caller that passes ``target_timestep`` per step (``target_timestep_for``). Guidance is
distilled in: sample with ``true_cfg_scale`` at or below 1 / no negative prompt.
The pipeline does not hand its generator to ``step``, so with ``r > 0`` the fresh noise
comes from torch's global RNG unless ``step`` gets a ``generator``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

TtMode = Literal["few", "mul", "any"]


def ucgm_sigmas(steps: int, *, gaps: tuple[float, float] | list[float],
                kumaraswamy: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """[steps + 1] float64 noise levels from ~1 down to exactly 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    g0, g1 = (float(g) for g in gaps)
    u = torch.linspace(g0, 1.0, steps + 1, dtype=torch.float64)[:-1] if g1 == 0 else \
        torch.linspace(g0, 1.0 - g1, steps, dtype=torch.float64)
    a, b, c = (float(v) for v in kumaraswamy)
    u = (1 - (1 - u.pow(a)).pow(b)).pow(c)
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


class TwinFlowUCGMScheduler(SchedulerMixin, ConfigMixin):
    """Few-step (1-4 NFE) sampler of a TwinFlow student, in the diffusers scheduler API."""

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        gaps: tuple[float, float] = (0.001, 0.6),
        kumaraswamy: tuple[float, float, float] = (1.0, 1.0, 1.0),
        stochastic_ratio: float = 1.0,
        tt_mode: TtMode = "few",
        sigma_source: Literal["ucgm", "given"] = "ucgm",
    ):
        if tt_mode not in ("few", "mul", "any"):
            raise ValueError(f"tt_mode must be 'few', 'mul' or 'any' (got {tt_mode!r})")
        if sigma_source not in ("ucgm", "given"):
            raise ValueError(f"sigma_source must be 'ucgm' or 'given' (got {sigma_source!r})")
        if len(gaps) != 2 or not all(0.0 <= g < 1.0 for g in gaps) or sum(gaps) >= 1.0:
            raise ValueError(f"gaps must be [g0, g1] in [0, 1) with g0 + g1 < 1 (got {list(gaps)})")
        if len(kumaraswamy) != 3 or not all(v > 0 for v in kumaraswamy):
            raise ValueError(f"kumaraswamy must be three positive numbers (got {list(kumaraswamy)})")
        if not 0.0 <= stochastic_ratio <= 1.0:
            raise ValueError(f"stochastic_ratio must be in [0, 1] (got {stochastic_ratio})")
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---- the diffusers scheduler protocol

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | None = None, mu: float | None = None,
                      timesteps: list[float] | None = None) -> None:
        """Build the grid. ``mu`` (the pipeline's resolution shift) does not apply to a distilled grid."""
        if timesteps is not None:
            raise ValueError("TwinFlowUCGMScheduler builds its own timesteps; pass num_inference_steps")
        if sigmas is not None and self.config.sigma_source == "given":
            s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
            decreasing = s.dim() == 1 and len(s) >= 1 and bool((s[:-1] > s[1:]).all())
            if not decreasing or not (0 < float(s[-1]) and float(s[0]) <= 1):
                raise ValueError("sigmas must be strictly decreasing in (0, 1]")
            grid = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
        else:
            steps = num_inference_steps if num_inference_steps is not None else (
                len(sigmas) if sigmas is not None else None)
            if steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (or sigmas, whose length is the step count)")
            grid = ucgm_sigmas(int(steps), gaps=self.config.gaps, kumaraswamy=self.config.kumaraswamy)
        self.num_inference_steps = len(grid) - 1
        self.sigmas = grid.to(device=device, dtype=torch.float32)
        self.timesteps = (grid[:-1] * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps first")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.timesteps.device).reshape(-1)[0]
        return int(torch.argmin((self.timesteps - t).abs()))

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def target_timestep_for(self, timestep: float | torch.Tensor) -> float:
        """tt in [0, 1] that the transformer should get at this timestep under ``tt_mode``."""
        i = self._step_index if self._step_index is not None else self.index_for_timestep(timestep)
        mode = self.config.tt_mode
        return {"few": 0.0, "mul": float(self.sigmas[i]), "any": float(self.sigmas[i + 1])}[mode]

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"step {i} beyond the {self.num_inference_steps}-step grid")
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        f, x = model_output.float(), sample.float()
        x_hat = x - s * f
        if s_next == 0.0:
            prev = x_hat
        else:
            z_hat = x + (1.0 - s) * f
            r = float(self.config.stochastic_ratio)
            mixed = math.sqrt(1.0 - r) * z_hat
            if r > 0:
                eps = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                                  dtype=torch.float32).to(x.device)
                mixed = mixed + math.sqrt(r) * eps
            prev = (1.0 - s_next) * x_hat + s_next * mixed
        self._step_index = i + 1
        prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
