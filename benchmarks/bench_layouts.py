"""Training throughput of the partitioned TwinFlow objective against the tutorial layout.

Same model (the embedded MLP: hidden 512, depth 4, latent [4, 4, 4], 10 classes),
same batch (128 rows), same target network (an EMA copy), same optimizer (AdamW).
A timed step is: ``TwinFlow.loss`` (every forward of the step) + backward + AdamW
step; the EMA update is the same for both layouts and is not timed. The two
layouts' steps are interleaved so that load from other processes on a shared
machine hits both alike; the median step time is reported, and the median process
CPU time per step beside it (less sensitive to other processes than wall time). Forward rows
per step are counted by the method itself (``TwinFlowOutput.forward_rows``).

    .venv/bin/python benchmarks/bench_layouts.py [--steps 20] [--warmup 3] [--device cpu]

Prints a Markdown table and the command that produced it.
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twinflow_train.config import MethodConfig, RenoiseConfig  # noqa: E402
from twinflow_train.method.twinflow import TwinFlow  # noqa: E402
from twinflow_train.models.mlp import MLPFlowModel  # noqa: E402
from twinflow_train.method.timesamplers import build_time_samplers  # noqa: E402

SHAPE = (4, 4, 4)
CLASSES = 10


def build(seed: int, device: torch.device) -> tuple[MLPFlowModel, MLPFlowModel]:
    torch.manual_seed(seed)
    model = MLPFlowModel(shape=SHAPE, num_classes=CLASSES, hidden=512, depth=4, time_dim=128).to(device)
    model.init_target_time_embedding("copy")
    target = copy.deepcopy(model).requires_grad_(False).eval()
    return model, target


class Arm:
    """One layout's model, target, optimizer and method, stepped one training step at a time."""

    def __init__(self, layout: str, *, order: int, device: torch.device, seed: int):
        self.layout, self.device = layout, device
        self.model, self.target = build(seed, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.method = TwinFlow(MethodConfig(layout=layout, estimate_order=order),
                               time_samplers=build_time_samplers(RenoiseConfig()))
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.grad_rows: list[int] = []
        self.nograd_rows: list[int] = []

    def step(self, x: torch.Tensor, cond: dict[str, torch.Tensor], gen: torch.Generator, k: int, *,
             record: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.method.loss(model=self.model, target=self.target, x=x, cond=cond, generator=gen, step=k)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(out.loss.detach()):
            raise RuntimeError(f"{self.layout}: non-finite loss at benchmark step {k}")
        if record:
            self.times.append(dt)
            self.cpu.append(dc)
            self.grad_rows.append(out.forward_rows["grad"])
            self.nograd_rows.append(out.forward_rows["no_grad"])

    def summary(self, batch: int) -> dict[str, float]:
        med = statistics.median(self.times)
        return {"step_s": med, "samples_s": batch / med, "cpu_s": statistics.median(self.cpu), "grad_rows": statistics.mean(self.grad_rows),
                "nograd_rows": statistics.mean(self.nograd_rows)}


def run(*, batch: int, steps: int, warmup: int, order: int, device: torch.device,
        seed: int) -> dict[str, dict[str, float]]:
    """Steps of the two layouts interleaved (ABBA...), so that load from other processes hits both alike."""
    arms = [Arm(layout, order=order, device=device, seed=seed) for layout in ("partitioned", "tutorial")]
    data_gen = torch.Generator(device="cpu").manual_seed(seed)
    for k in tqdm(range(warmup + steps), desc="steps"):
        x = torch.randn(batch, *SHAPE, generator=data_gen).to(device)
        cond = {"labels": torch.randint(0, CLASSES, (batch,), generator=data_gen).to(device)}
        for arm in (arms if k % 2 == 0 else arms[::-1]):
            gen = torch.Generator(device=device).manual_seed(seed * 100_003 + k)
            arm.step(x, cond, gen, k, record=k >= warmup)
    return {arm.layout: arm.summary(batch) for arm in arms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--order", type=int, default=2, help="RCGM estimate order N")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    results = run(batch=args.batch, steps=args.steps, warmup=args.warmup, order=args.order, device=device,
                  seed=args.seed)
    base = results["partitioned"]["samples_s"]
    B = args.batch
    cpu_base = results["partitioned"]["cpu_s"]
    print(f"| layout | samples/s | median step (s) | speed vs partitioned | CPU s/step | CPU cost vs partitioned "
          f"| grad rows/step | no-grad rows/step | grad fwd/row | no-grad fwd/row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout, r in results.items():
        print(f"| {layout} | {r['samples_s']:.1f} | {r['step_s']:.4f} | {r['samples_s'] / base:.2f}x "
              f"| {r['cpu_s']:.3f} | {r['cpu_s'] / cpu_base:.2f}x "
              f"| {r['grad_rows']:.0f} | {r['nograd_rows']:.1f} | {r['grad_rows'] / B:.2f} | {r['nograd_rows'] / B:.2f} |")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print()
    print(f"MLP hidden 512, depth 4, latent {list(SHAPE)}, {CLASSES} classes; batch {B}; N = {args.order}; "
          f"{args.steps} timed steps each (interleaved) after {args.warmup} warm-up; device {dev}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads.")
    print(f"Command: `{' '.join(shlex.quote(a) for a in ['.venv/bin/python', 'benchmarks/bench_layouts.py', *(argv if argv is not None else sys.argv[1:])])}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
