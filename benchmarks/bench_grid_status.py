"""`twinflow-lab grid status` on a large grid: this version (tail of each metrics file) vs a reference commit.

Generates a grid of synthetic run directories with the run-directory module's own
writers (``rundir.MetricsWriter``, ``rundir.write_status``): ``--runs`` runs of
``--steps`` training records each (``run.log_every: 1``, the worst case; a
validation record every 500 steps; realistic keys), 80% done, 10% failed, 10% left
``running`` by a dead process. Then times the whole command line, a fresh process
each time, this tree and the reference tree (``git archive`` of ``--ref``)
interleaved. ``--drop-caches`` (root, Linux) empties the page cache before every
timing, so the files are read from disk.

    python benchmarks/bench_grid_status.py --runs 100 --steps 10000 --drop-caches
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinflow_train import rundir  # noqa: E402

BASE = "run: {steps: STEPS, log_every: 1, val_every: 500}\n"
DEAD_PID = 2**22 + 777


def _record(step: int, seed: int) -> dict:
    loss = 1.0 / (1 + step * 1e-3) + 1e-3 * seed
    return {"step": step, "kind": "train", "loss/total": loss, "loss/main": loss * 0.7, "loss/rect": loss * 0.3,
            "grad_norm/total": 1.0 + 1e-4 * step, "grad_norm/max": 1.1, "lr": 3e-4, "count/nonfinite": 0,
            "count/spikes": 0, "event/spike": 0, "event/decay": 0, "event/skipped": 0, "event/nonfinite": 0,
            "renoise/bias": 0.5, "time/step_s": 0.0123, "time/wall_s": step * 0.0123, "time/train_s": step * 0.012}


def generate(root: Path, *, runs: int, steps: int) -> Path:
    arms = max(1, runs // 10)
    seeds = runs // arms
    grid = root / "big"
    matrix = root / "big.yaml"
    (root / "base.yaml").write_text(BASE.replace("STEPS", str(steps)))
    arm_lines = "".join(f"  arm{a:02d}: {{optim.lr: {1e-4 * (a + 1):.6f}}}\n" for a in range(arms))
    matrix.write_text(f"name: big\nbase: base.yaml\nseeds: {list(range(seeds))}\narms:\n{arm_lines}")
    marker = root / f".generated-{runs}x{steps}"
    if marker.is_file():
        return matrix
    for a in range(arms):
        for s in range(seeds):
            d = grid / f"arm{a:02d}" / f"seed-{s}"
            w = rundir.MetricsWriter(d / rundir.METRICS_FILE)
            w.write({"step": 0, "kind": "teacher", "teacher/fd": 3.0})
            for step in range(1, steps + 1):
                w.write(_record(step, s))
                if step % 500 == 0:
                    w.write({"step": step, "kind": "val", "val/loss": 0.5, "val/fd_nfe1": 9.0,
                             "time/wall_s": step * 0.0123})
            w.close()
            i = a * seeds + s
            if i % 10 == 8:
                rundir.write_status(d, "failed", step=steps, reason="RuntimeError: synthetic")
            elif i % 10 == 9:
                rundir.write_status(d, "running", step=steps, pid=DEAD_PID)
            else:
                rundir.write_status(d, "done", step=steps)
    marker.write_text("")
    return matrix


def reference_tree(ref: str, dest: Path) -> Path:
    if not (dest / "harness").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "harness", "twinflow_train", "reports"],
                              check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            t.extractall(dest)
    return dest


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_status(tree: Path, matrix: Path, root: Path, *, cold: bool) -> tuple[float, str]:
    if cold:
        drop_caches()
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "harness.cli", "grid", "status", str(matrix), "--root", str(root)],
                       env=env, capture_output=True, text=True, cwd=root)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"grid status failed under {tree}: {r.stderr[-2000:]}")
    return wall, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--ref", default="26d7949", help="reference commit (the whole-file reader)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--drop-caches", action="store_true", help="read from disk: drop the page cache before each")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-grid-status")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    matrix = generate(args.out, runs=args.runs, steps=args.steps)
    gen_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (args.out / "big").rglob(rundir.METRICS_FILE))
    old = reference_tree(args.ref, args.out / f"ref-{args.ref}")
    times: dict[str, list[float]] = {"reference": [], "this": []}
    outputs = {}
    for _ in range(args.repeat):
        for name, tree in (("reference", old), ("this", REPO)):
            wall, out = time_status(tree, matrix, args.out, cold=args.drop_caches)
            times[name].append(wall)
            outputs[name] = out
    same_rows = [ln.split()[:4] for ln in outputs["reference"].splitlines()[3:3 + args.runs]] == \
                [ln.split()[:4] for ln in outputs["this"].splitlines()[3:3 + args.runs]]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"runs": args.runs, "steps": args.steps, "metrics_bytes": size, "generate_s": round(gen_s, 1),
              "cold": args.drop_caches, "times_s": times, "median_s": med, "speedup": med["reference"] / med["this"],
              "same_rows": same_rows}
    print(json.dumps(result, indent=1))
    print(f"\n| grid | metrics on disk | page cache | `grid status`, {args.ref} | this version | ratio |\n"
          f"|---|---|---|---|---|---|\n| {args.runs} runs x {args.steps} steps | {size / 2**20:.0f} MiB | "
          f"{'dropped before each' if args.drop_caches else 'warm'} | {med['reference']:.2f} s | {med['this']:.2f} s | "
          f"{result['speedup']:.0f}x |")
    return 0 if same_rows else 1


if __name__ == "__main__":
    sys.exit(main())
