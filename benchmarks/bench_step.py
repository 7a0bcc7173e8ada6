"""CPU seconds per training step: this tree against a base commit, side by side on one machine.

Both versions train their own committed config (default ``configs/digits.yaml`` of each tree) from the same
teacher, codec and auxiliaries, each in its own subprocess with ``PYTHONPATH`` pointing at
its own source tree (the base is unpacked with ``git archive``). A worker builds the run
with its tree's own ``build_run`` and then runs the trainer's hot loop for the timed
steps exactly as ``_loop`` does on non-validation steps: set the learning rate,
``train_step``, ``_apply_update``, and on log steps read every statistic back to the
host (and, where the tree has it, ``_settle`` the device-decided steps). Validation,
sampling and checkpoints are left out: they are the same code in both trees and not
part of a step.

Repetitions alternate the order of the two versions (base, new, new, base, ...), so that
load drift on a shared machine hits both alike. Reported per version: the median over
repetitions of process CPU seconds per step (``time.process_time``; robust to other
processes on the machine, unlike wall time, also given) and the ratio base / new. Loss
agreement: the ``loss/total`` of every timed step of the first repetition, compared
step by step (max absolute and relative difference).

The machine is described in the summary (CPU model, whether it has AMX and AVX-512 bf16,
which decide what bf16 products cost) and the load is recorded around every repetition
(``os.getloadavg``: on a shared machine the CPU-second ratio is the figure, and the load
says how much to trust it).

The floor (first repetition of each version): every matrix product one step issues
(``aten.addmm``/``mm``/``bmm``, recorded with their shapes and layouts by a dispatch mode
over one more step), replayed back to back on random data of the same shapes and timed
in CPU seconds. It is what a step would cost with nothing but its matrix products, on
warm caches: an optimistic lower bound, and ``base / floor(new)`` bounds the ratio any
removal of overhead could reach without less arithmetic.

    python benchmarks/bench_step.py [--base 26d7949] [--steps 200] [--reps 3] [--threads 1] [--no-floor]
        [--new-override parallel.fsdp=never --new-override parallel.mixed_precision=bf16]
        [--override parallel.fsdp=never --override parallel.mixed_precision=bf16]   # both versions in bf16

The teacher must be cached for the config (``twinflow-train teacher --config ...``);
both versions are pointed at that one weights file (``teacher.checkpoint``), so a changed
teacher recipe in this tree does not change what the two runs start from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- worker (runs inside one tree)


def _tree_module(name: str, flat: str):
    """A trainer module of the tree this worker runs in: sub-packages now, one flat package at older commits."""
    import importlib

    try:
        return importlib.import_module(f"twinflow_train.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"twinflow_train.{flat}")


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from twinflow_train.config import load_config

    trainer = _tree_module("run.trainer", "trainer")
    parallel = _tree_module("distributed.parallel", "parallel")
    init_distributed, shutdown = parallel.init_distributed, parallel.shutdown

    cfg = load_config(Path(args.config), args.override)
    d = init_distributed(cfg.run, cfg.parallel)
    run = trainer.build_run(cfg, d, Path(cfg.teacher.checkpoint))
    settle = getattr(trainer, "_settle", None)
    losses = []

    def one(step: int) -> None:
        lr = run.policy.lr(step)
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        stats = trainer.train_step(run, step)
        trainer._apply_update(run, step, stats)
        losses.append(stats["loss/total"])
        if step % cfg.run.log_every == 0:
            if settle is not None:
                settle(run)
            {k: float(v) for k, v in stats.items()}  # the log record's host read

    for step in range(1, args.warmup + 1):
        one(step)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(args.warmup + 1, args.warmup + args.steps + 1):
        one(step)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if settle is not None:
        settle(run)
    result = {"cpu_s_per_step": cpu / args.steps, "wall_s_per_step": wall / args.steps,
              "losses": [float(v) for v in losses]}  # the recorded step below is not compared
    if args.floor:
        products = record_products(lambda: one(args.warmup + args.steps + 1))
        result.update(floor_s_per_step=replay_products(products), products_per_step=len(products),
                      gflop_per_step=sum(flop for _, _, flop in products) / 1e9)
    print(json.dumps(result))
    shutdown()


_PRODUCTS = ("addmm", "mm", "bmm")


def record_products(step) -> list[tuple[str, list[tuple[tuple[int, ...], tuple[int, ...], str]], int]]:
    """(op, [(shape, stride, dtype) of each tensor argument], flop) of every matrix product ``step()`` issues."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[str, list[tuple[tuple[int, ...], tuple[int, ...], str]], int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _PRODUCTS:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                a, b = tensors[-2], tensors[-1]
                flop = 2 * a.numel() * b.shape[-1]
                seen.append((name, [(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."))
                                    for t in tensors], flop))
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    return seen


def replay_products(products, *, reps: int = 20) -> float:
    """CPU seconds of one step's matrix products alone, replayed back to back (median of ``reps``)."""
    import torch

    def like(shape: tuple[int, ...], stride: tuple[int, ...], dtype: str) -> torch.Tensor:
        dt = getattr(torch, dtype)
        if len(shape) == 2 and stride[0] == 1 and stride[1] != 1:  # a transposed view (weights, backward)
            return torch.randn(shape[1], shape[0], dtype=dt).t()
        return torch.randn(shape, dtype=dt)

    calls = [(getattr(torch, name), [like(*layout) for layout in layouts]) for name, layouts, _ in products]
    times = []
    for _ in range(reps + 2):
        t0 = time.process_time()
        for fn, tensors in calls:
            fn(*tensors)
        times.append(time.process_time() - t0)
    return statistics.median(times[2:])



# --------------------------------------------------------------------------- driver


def unpack(commit: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def teacher_weights(config: Path, overrides: list[str]) -> Path:
    sys.path.insert(0, str(ROOT))
    from twinflow_train.config import load_config
    from twinflow_train.assets.teacher import teacher_path

    path = teacher_path(load_config(config, overrides))
    if not path.is_file():
        raise SystemExit(f"bench_step: no cached teacher at {path}; run `twinflow-train teacher --config {config}` first")
    return path


def machine() -> dict:
    """The CPU model, its bf16-relevant flags and the core count (Linux ``/proc/cpuinfo``)."""
    info = {"cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return info | {"cpu": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def run_worker(tree: Path, args: argparse.Namespace, overrides: list[str], *, floor: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(args.config),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += [x for o in overrides for x in ("--override", o)] + ([] if floor else ["--no-floor"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tree))
    if out.returncode != 0:
        raise SystemExit(f"bench_step: worker in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="26d7949", help="commit to compare against")
    p.add_argument("--config", type=Path, default=Path("configs/digits.yaml"),
                   help="relative: each tree's own file (the committed config of each version)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per repetition")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator, caches)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per version, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--override", action="append", default=[], help="extra key=value for both versions")
    p.add_argument("--new-override", action="append", default=[],
                   help="extra key=value for this tree only: an option the base does not have (e.g. "
                        "parallel.fsdp=never with parallel.mixed_precision=bf16)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the matrix-product floor (measured in each version's first repetition)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    tpath = teacher_weights(args.config if args.config.is_absolute() else ROOT / args.config, args.override)
    overrides = args.override + [f"teacher.checkpoint={tpath}"]
    with tempfile.TemporaryDirectory(prefix="bench-step-base-") as tmp:
        trees = {"base": unpack(args.base, Path(tmp)), "new": ROOT}
        results: dict[str, list[dict]] = {"base": [], "new": []}
        for rep in range(args.reps):
            order = ["base", "new"] if rep % 2 == 0 else ["new", "base"]
            for name in order:
                over = overrides + (args.new_override if name == "new" else [])
                load0 = os.getloadavg()[0]
                results[name].append(run_worker(trees[name], args, over, floor=args.floor and rep == 0))
                r = results[name][-1]
                r["load"] = [load0, os.getloadavg()[0]]
                floor = f", matrix products alone {1e3 * r['floor_s_per_step']:.1f} ms" if "floor_s_per_step" in r else ""
                print(f"rep {rep + 1} {name:4s}: {1e3 * r['cpu_s_per_step']:.1f} ms CPU/step "
                      f"({1e3 * r['wall_s_per_step']:.1f} ms wall{floor}; load average {load0:.1f} -> "
                      f"{r['load'][1]:.1f})", flush=True)
    cpu = {k: statistics.median(r["cpu_s_per_step"] for r in v) for k, v in results.items()}
    wall = {k: statistics.median(r["wall_s_per_step"] for r in v) for k, v in results.items()}
    a, b = results["base"][0]["losses"], results["new"][0]["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    first_steps = min(20, len(diffs))
    summary = {
        "base": args.base, "config": str(args.config), "overrides": args.override,
        "new_overrides": args.new_override, "steps": args.steps, "machine": machine(),
        "load_average": {k: [round(x, 2) for r in v for x in r["load"]] for k, v in results.items()},
        "cpu_ms_per_rep": {k: [round(1e3 * r["cpu_s_per_step"], 2) for r in v] for k, v in results.items()},
        "warmup": args.warmup, "reps": args.reps,
        "threads": args.threads, "cpu_ms_per_step": {k: 1e3 * v for k, v in cpu.items()},
        "wall_ms_per_step": {k: 1e3 * v for k, v in wall.items()},
        "speedup_cpu": cpu["base"] / cpu["new"], "speedup_wall": wall["base"] / wall["new"],
        "loss_max_abs_diff": max(diffs), "loss_max_rel_diff": max(rel),
        f"loss_max_rel_diff_first_{first_steps}_steps": max(rel[:first_steps]),
        "loss_mean": {"base": statistics.fmean(a), "new": statistics.fmean(b)},
    }
    if args.floor:
        floor = {k: v[0]["floor_s_per_step"] for k, v in results.items()}
        summary.update({
            "floor_ms_per_step": {k: 1e3 * v for k, v in floor.items()},
            "gflop_per_step": {k: v[0]["gflop_per_step"] for k, v in results.items()},
            "products_per_step": {k: v[0]["products_per_step"] for k, v in results.items()},
            "new_above_floor_ms": 1e3 * (cpu["new"] - floor["new"]),
            "speedup_bound_cpu": cpu["base"] / floor["new"],  # the ratio with nothing left but matrix products
        })
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
