"""Training steps a ladder computes with forks and without, and that forks change no result.

Counts (from the configs alone, ``harness.forks`` and ``harness.cost``): the steps of every run of the
matrix, at a sequential plan's first wave and at its maximum, with each arm forked where it shares first
steps with another and with every run from step 0.

``--run ROOT`` also runs the matrix twice (forks, then ``--no-forks``) at a reduced length
(``--steps``, one seed per arm by default, every arm's schedule scaled with ``vars.steps``), and prints
the steps each computed, the wall time, and whether every forked run's sample files and records after
its fork are bit-identical to the run trained from step 0::

    python benchmarks/bench_forks.py ablations/blog-digits.yaml
    TWINFLOW_LAB_CACHE=<cache> python benchmarks/bench_forks.py ablations/blog-digits.yaml --run /tmp/bf \
        --steps 120 --workers 2
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.cost import grid_cost  # noqa: E402
from harness.forks import describe, plan_forks  # noqa: E402
from harness.grid import run_grid  # noqa: E402
from harness.launchers import LocalLauncher  # noqa: E402
from harness.matrix import load_matrix  # noqa: E402


def _derived(matrix: Path, out: Path, *, steps: int, seeds: list[int]) -> Path:
    data = yaml.safe_load(matrix.read_text())
    data["base"] = str((matrix.parent / data["base"]).resolve())
    data.setdefault("vars", {})["steps"] = steps
    data["seeds"] = seeds
    data.setdefault("overrides", {})["eval.n_samples"] = 200
    out.mkdir(parents=True, exist_ok=True)
    path = out / matrix.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_as_scratch(forked: Path, scratch: Path) -> bool:
    fork = json.loads((forked / "fork.json").read_text())
    k = int(fork["step"])
    mine = [r for r in _records(forked) if r.get("kind") != "event"]
    theirs = [r for r in _records(scratch) if r["step"] > k and r.get("kind") != "teacher"]
    if mine != theirs:
        return False
    for f in sorted((scratch / "samples").glob("*.npz")):
        with np.load(f) as a, np.load(forked / "samples" / f.name) as b:
            if not all(np.array_equal(a[key], b[key]) for key in a.files):
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("matrix", type=Path)
    p.add_argument("--run", type=Path, default=None, metavar="ROOT", help="also run the matrix with and without forks")
    p.add_argument("--steps", type=int, default=120, help="vars.steps of the runs (--run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the runs (--run)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    grid = load_matrix(args.matrix)
    with_forks, without = grid_cost(grid)
    print("\n".join(describe(plan_forks(grid))))
    print("\n".join(with_forks.lines()))
    if without is not None:
        print("\n".join(without.lines()))
        print(f"forks: {with_forks.most.steps / without.most.steps:.3f} of the steps at the maximum"
              + (f", {with_forks.first.steps / without.first.steps:.3f} at the first wave" if grid.plan else ""))
    if args.run is None:
        return 0

    matrix = _derived(args.matrix, args.run, steps=args.steps, seeds=args.seeds)
    out = {}
    for name, forks in (("forks", True), ("scratch", False)):
        g = load_matrix(matrix, root=args.run / name)
        t0 = time.perf_counter()
        res = run_grid(g, launcher=LocalLauncher(workers=args.workers), stream=io.StringIO(), tty=False, forks=forks)
        out[name] = (g, res, time.perf_counter() - t0)
        print(f"{name}: {res.steps_computed:,} steps computed, {out[name][2]:.1f} s wall, outcomes "
              f"{sorted(set(res.outcomes.values()))}")
    g_f, res_f, wall_f = out["forks"]
    g_s, res_s, wall_s = out["scratch"]
    forked = [s for s in g_f.runs if (s.run_dir / "fork.json").is_file()
              and "fallback" not in json.loads((s.run_dir / "fork.json").read_text())]
    same = {s.key: _same_as_scratch(s.run_dir, g_s.grid_dir / s.arm / f"seed-{s.seed}") for s in forked}
    print(f"forked runs: {len(forked)}; bit-identical to from step 0: {sum(same.values())}/{len(same)}"
          + ("" if all(same.values()) else f" (differ: {[k for k, v in same.items() if not v]})"))
    print(f"steps: {res_f.steps_computed:,} / {res_s.steps_computed:,} = "
          f"{res_f.steps_computed / res_s.steps_computed:.3f}; wall: {wall_f:.1f} / {wall_s:.1f} s = "
          f"{wall_f / wall_s:.3f}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
