"""Report build time for a large grid of synthetic telemetry.

Default: 100 runs (10 arms x 10 seeds) x 10,000 logged steps each (log_every=1),
a validation every 500 steps at 1/2/4 NFE, sample files for every run. Times the
report from the collected telemetry table (what ``build_report`` does after the
harness's ``collect_grid``); ``--from-disk`` also writes the run directories and
times the steps of ``build_report`` on them (the harness's collection, then the
report), with the harness's Parquet cache cold and warm.

    taskset -c 0,1 .venv/bin/python benchmarks/bench_report.py
    taskset -c 0,1 .venv/bin/python benchmarks/bench_report.py --from-disk
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import collect  # noqa: E402
from reports.build import write_report  # noqa: E402
from reports.data import prepare  # noqa: E402
from reports.synthetic import _sample_images, synthetic_grid_frames, write_synthetic_grid  # noqa: E402


def _write_samples(root: Path, arms: list[str], seeds: list[int], nfe: list[int]) -> None:
    labels = np.repeat(np.arange(10, dtype=np.int64), 4)
    rng = np.random.default_rng(0)
    for arm in arms:
        for s in seeds:
            d = root / arm / f"seed-{s}" / "samples"
            d.mkdir(parents=True, exist_ok=True)
            for n in nfe:
                for which in ("final", "best"):
                    np.savez(d / f"{which}-nfe{n}.npz", images=_sample_images(labels, noise=0.5 / n, rng=rng),
                             labels=labels)
            np.savez(d / "teacher.npz", images=_sample_images(labels, noise=0.05, rng=rng), labels=labels)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", type=int, default=10)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--steps", type=int, default=10_000, help="logged steps per run")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--from-disk", action="store_true", help="also time build_report on written run directories")
    p.add_argument("--keep", type=Path, default=None, help="write the report here (default: a temp dir)")
    args = p.parse_args()

    arms = [f"arm{i:02d}" for i in range(args.arms)]
    seeds = list(range(args.seeds))
    nfe = [1, 2, 4]
    diverge = {(arms[2], 0): args.steps // 2, (arms[2], 1): int(args.steps * 0.7)}
    cores = len(os.sched_getaffinity(0))
    print(f"grid: {len(arms)} arms x {len(seeds)} seeds = {len(arms) * len(seeds)} runs x {args.steps} logged steps; "
          f"{cores} core(s) available")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        metrics, statuses = synthetic_grid_frames(arms=arms, seeds=seeds, steps=args.steps, log_every=1,
                                                  val_every=args.val_every, nfe=nfe, diverge=diverge, grid="bench",
                                                  root=str(tmp))
        _write_samples(tmp / "bench", arms, seeds, nfe)
        print(f"generated {len(metrics):,} records x {metrics.shape[1]} columns in {time.perf_counter() - t0:.1f} s "
              f"(not timed below)")

        out = args.keep or tmp / "report"
        c0 = time.process_time()
        t0 = time.perf_counter()
        data = prepare(name="bench (synthetic)", metrics=metrics, statuses=statuses, grid_dir=tmp / "bench")
        t1 = time.perf_counter()
        write_report(data, out_dir=out, progress=False, title_note="Synthetic telemetry (benchmark).")
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # the machine may be shared: CPU seconds and the load average say how much the wall time was inflated
        print(f"report from the telemetry table: {t2 - t0:.1f} s wall, {cpu:.1f} s CPU (prepare {t1 - t0:.1f} s, "
              f"write_report {t2 - t1:.1f} s); load average {os.getloadavg()[0]:.1f}; peak RSS {rss:.0f} MiB; "
              f"{out / 'report.html'} {(out / 'report.html').stat().st_size / 1e6:.1f} MB")

        if args.from_disk:
            t0 = time.perf_counter()
            grid = write_synthetic_grid(tmp / "disk" / "bench", arms=arms, seeds=seeds, steps=args.steps, log_every=1,
                                        val_every=args.val_every, nfe=nfe, diverge=diverge)
            print(f"wrote run directories in {time.perf_counter() - t0:.1f} s (not timed)")
            for label in ("cold Parquet cache", "warm Parquet cache"):
                # the steps of build_report, timed one by one (the first three are the harness's)
                t = [time.perf_counter()]
                metrics = collect.collect_grid(grid)
                t.append(time.perf_counter())
                statuses = collect.run_statuses(grid)
                t.append(time.perf_counter())
                divergence = collect.divergence_summary(metrics)
                t.append(time.perf_counter())
                data = prepare(name=grid.name, metrics=metrics, statuses=statuses, arm_order=arms, grid_dir=grid,
                               divergence=divergence)
                write_report(data, out_dir=tmp / "disk-report", progress=False)
                t.append(time.perf_counter())
                d = np.diff(t)
                print(f"from disk, {label}: {t[-1] - t[0]:.1f} s = collect_grid {d[0]:.1f} + run_statuses {d[1]:.1f} "
                      f"+ divergence_summary {d[2]:.1f} + report {d[3]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
