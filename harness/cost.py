"""What a grid computes: runs, training steps and (where a model family has an estimate) GPU-hours, at a
sequential plan's first wave and at its maximum; the grid's dry run prints it.

GPU-hours are an estimate, stated with its assumptions: the Qwen-Image transformer's matmul FLOPs per image
token (``twinflow_train.models.qwen_image.flops_per_token``) at the ladder's reference bucket (1328 x 1328,
256 text tokens), per row one forward and backward with grad (3 forwards) plus the measured no-grad forwards of
the partitioned objective (2.96 per row, BENCHMARKS.md), at an assumed model-FLOPs utilisation of the card's
dense bf16 peak. The reward decode of RL arms is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .forks import plan_forks

PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100/H200 SXM (vendor datasheet)."""
ASSUMED_MFU = 0.30
NO_GRAD_FORWARDS_PER_ROW = 2.96
IMAGE_TOKENS = (1328 // 16) ** 2  # 8x VAE downsampling, 2x2 patches
TEXT_TOKENS = 256


def step_flops(cfg: Any) -> float | None:
    """Matmul FLOPs of one training step of ``cfg``, or None where the family has no estimate."""
    if cfg.model.family != "qwen_image" or cfg.model.qwen.tiny:
        return None
    from twinflow_train.models.qwen_image import flops_per_token  # lazy: torch and diffusers (the qwen extra)

    per_row = flops_per_token({}, image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS) * IMAGE_TOKENS
    return cfg.data.batch_size * per_row * (3 + NO_GRAD_FORWARDS_PER_ROW)


@dataclass
class Tally:
    runs: int = 0
    steps: int = 0
    gpu_hours: float | None = None

    def add(self, steps: int, flops_per_step: float | None) -> None:
        self.runs += 1
        self.steps += steps
        if flops_per_step is not None:
            h = steps * flops_per_step / (PEAK_TFLOPS * 1e12 * ASSUMED_MFU) / 3600
            self.gpu_hours = (self.gpu_hours or 0.0) + h


@dataclass
class GridCost:
    name: str
    first: Tally = field(default_factory=Tally)
    most: Tally = field(default_factory=Tally)
    sequential: bool = False
    note: str = ""

    def lines(self) -> list[str]:
        def one(label: str, t: Tally) -> str:
            gpu = "" if t.gpu_hours is None else f", ~{t.gpu_hours:,.0f} GPU-hours"
            return f"  {label}: {t.runs} runs, {t.steps:,} training steps{gpu}"

        out = [f"grid {self.name}: what it computes" + (f" ({self.note})" if self.note else "")]
        if self.sequential:
            out += [one("first wave", self.first), one("at the maximum", self.most)]
        else:
            out.append(one("every run", self.most))
        if self.most.gpu_hours is not None:
            out.append(f"  GPU-hours: 1328x1328, {TEXT_TOKENS} text tokens, {ASSUMED_MFU:.0%} of a "
                       f"{PEAK_TFLOPS:.0f} TFLOP/s bf16 peak, reward decode not counted (harness/cost.py)")
        return out


def grid_cost(grid: Any, *, forks: bool = True) -> tuple[GridCost, GridCost | None]:
    """Runs, steps and GPU-hours of ``grid`` (at its first wave and at its maximum for a sequential plan), with
    the forks ``harness.forks`` plans (a child computes its steps after the fork only), and without them
    (None when no arm forks or ``forks`` is false)."""
    plan = plan_forks(grid) if forks else {}

    def tally(shared: bool) -> GridCost:
        cost = GridCost(name=grid.name, sequential=grid.plan is not None,
                        note="with forks" if shared else ("without forks" if plan else ""))
        first = grid.plan.first if grid.plan is not None else None
        for spec in grid.runs:
            flops = step_flops(spec.config)
            steps = spec.config.run.steps - (plan[spec.arm].step if shared and spec.arm in plan else 0)
            cost.most.add(steps, flops)
            if first is not None and spec.seed < first:
                cost.first.add(steps, flops)
        return cost

    return (tally(True), tally(False)) if plan else (tally(False), None)
