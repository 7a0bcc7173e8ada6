"""Harness benchmark: scheduling overhead of a grid on 2 workers, and the cost of writing telemetry.

1. A grid of ``--runs`` short runs of the real trainer on ``--workers`` local workers.
   Target: grid wall time (first launch to last end) <= 1.1 x (sum of the runs' own
   wall times / workers). Run times come from harness.json (process start to exit).
2. Telemetry writing: the trainer's ``MetricsWriter.write`` on the records those runs
   logged (one per step, ``run.log_every: 1``, the worst case), with the fsync it does
   at every checkpoint, against the runs' measured ``time/step_s``. Target: < 2 %.

    .venv/bin/python benchmarks/bench_harness.py                   # digits config, 4 runs of 120 steps
    .venv/bin/python benchmarks/bench_harness.py --steps 60 --runs 6

Prints a Markdown block for BENCHMARKS.md; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.grid import run_grid  # noqa: E402
from harness.launchers import LocalLauncher, available_cores  # noqa: E402
from harness.matrix import load_matrix  # noqa: E402
from harness.store import read_metrics, read_record  # noqa: E402


def _matrix(dir_: Path, *, base: Path, runs: int, steps: int, n_samples: int, aux_steps: int) -> Path:
    arms = "\n".join(f"  r{i}: {{method.rect_weight: {1.0 - 0.05 * i:.2f}}}" for i in range(runs))
    # the shared networks only need to exist: their training length does not change a run's step time
    aux = (f", codec.steps: {aux_steps}, aux.reward_steps: {aux_steps}, aux.eval_steps: {aux_steps}, "
           f"teacher.steps: {aux_steps}") if aux_steps else ""
    text = (f"name: bench\nbase: {base}\nseeds: [0]\n"
            f"overrides: {{run.steps: {steps}, run.log_every: 1, run.val_every: {steps}, "
            f"run.ckpt_every: {max(1, steps // 4)}, eval.n_samples: {n_samples}{aux}}}\n"
            f"arms:\n{arms}\n")
    path = dir_ / "bench.yaml"
    path.write_text(text)
    return path


def bench_grid(args: argparse.Namespace, root: Path) -> dict:
    matrix = _matrix(root, base=args.base.resolve(), runs=args.runs, steps=args.steps, n_samples=args.n_samples,
                     aux_steps=args.aux_steps)
    grid = load_matrix(matrix, root=root / "runs")
    launcher = LocalLauncher(workers=args.workers)
    result = run_grid(grid, launcher=launcher, stream=io.StringIO(), tty=False, poll_s=0.05)
    if result.exit_code != 0:
        raise SystemExit(f"benchmark grid did not finish cleanly: {result.outcomes}")
    run_times = []
    step_s = []
    records = []
    for spec in grid.runs:
        a = read_record(spec.run_dir).attempts[-1]
        run_times.append(a.ended - a.started)
        recs = read_metrics(spec.run_dir / "metrics.jsonl")
        records.extend(r for r in recs if r.get("kind") == "train")
        # the first steps include start-up work; the steady state is what telemetry competes with
        steady = [r["time/step_s"] for r in recs if r.get("kind") == "train" and r["step"] > 5]
        step_s.append(statistics.median(steady))
    ideal = sum(run_times) / args.workers
    return {"runs": len(run_times), "workers": args.workers, "threads_per_run": launcher.threads,
            "grid_wall_s": result.runs_wall_s, "sum_run_s": sum(run_times), "ideal_s": ideal,
            "ratio": result.runs_wall_s / ideal, "teacher_s": result.teacher_s,
            "median_step_s": statistics.median(step_s), "records": records,
            "ckpt_every": max(1, args.steps // 4)}


def bench_telemetry(records: list[dict], *, ckpt_every: int, repeats: int) -> float:
    """Seconds per record written by the trainer's writer (flush per record, fsync per checkpoint)."""
    from twinflow_train.rundir import MetricsWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = MetricsWriter(Path(tmp) / "metrics.jsonl")
        n = 0
        t0 = time.perf_counter()
        for _ in range(repeats):
            for rec in records:
                writer.write(rec)
                n += 1
                if n % ckpt_every == 0:
                    writer.sync()
        elapsed = time.perf_counter() - t0
        writer.close()
    return elapsed / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=REPO / "configs" / "digits.yaml", help="trainer config of the runs")
    p.add_argument("--runs", type=int, default=4, help="runs in the grid (even: no idle tail on 2 workers)")
    p.add_argument("--steps", type=int, default=120, help="steps per run")
    p.add_argument("--n-samples", type=int, default=100, help="eval.n_samples of the final validation")
    p.add_argument("--aux-steps", type=int, default=300, help="training steps of the teacher, codec, reward and "
                   "eval nets (0: the base config's); they are trained once and cached")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="passes over the records in the telemetry benchmark")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-harness-") as tmp:
        g = bench_grid(args, Path(tmp))
    per_record = bench_telemetry(g.pop("records"), ckpt_every=g["ckpt_every"], repeats=args.repeats)
    g["write_s_per_record"] = per_record
    g["telemetry_share"] = per_record / g["median_step_s"]
    machine = f"{platform.machine()}, {available_cores()} cores available"
    print(f"""
Command: `.venv/bin/python benchmarks/bench_harness.py {' '.join(sys.argv[1:])}`  ({machine})

| measure | value | target |
|---|---|---|
| grid of {g['runs']} runs x {args.steps} steps, {g['workers']} workers ({g['threads_per_run']} thread(s) each): wall, first launch to last end | {g['grid_wall_s']:.1f} s | |
| sum of run times / {g['workers']} (each run: process start to exit) | {g['ideal_s']:.1f} s | |
| ratio | **{g['ratio']:.3f}** | <= 1.1 |
| median training step (`time/step_s`, steps > 5) | {g['median_step_s'] * 1e3:.2f} ms | |
| writing one metrics record (`MetricsWriter.write`, fsync per checkpoint) | {per_record * 1e6:.1f} us | |
| telemetry share of a step at `log_every: 1` | **{100 * g['telemetry_share']:.3f} %** | < 2 % |
| shared-asset preparation before the grid (teacher etc., cached after the first time) | {g['teacher_s']:.1f} s | |
""")
    if args.json:
        args.json.write_text(json.dumps(g, indent=1))
    ok = g["ratio"] <= 1.1 and g["telemetry_share"] < 0.02
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
