"""Quality on digits: student FD at 1/2/4 NFE against the teacher, within a training-time budget.

Runs the partitioned objective and the tutorial layout from the same teacher for
the same training-time budget (validation time excluded, ``run.max_train_s``),
then prints the FD-vs-training-time curve of both and the final comparison with
the teacher's 28-step FD (at the distilled guidance) and its own 1-, 2- and
4-step Euler FD.

    python benchmarks/bench_quality.py --budget-s 300 --out runs/bench-quality

Uses the cache in ``$TWINFLOW_LAB_CACHE`` (teacher and auxiliaries are trained
on first use and not counted in the budget).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from twinflow_train.rundir import iter_metrics

REPO = Path(__file__).resolve().parents[1]


def _records_of(run_dir: Path) -> list[dict]:
    return list(iter_metrics(run_dir / "metrics.jsonl"))


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "twinflow_train.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    ap.add_argument("--budget-s", type=float, default=300.0, help="training seconds per layout")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-quality")
    ap.add_argument("--layouts", nargs="+", default=["partitioned", "tutorial"])
    ap.add_argument("overrides", nargs="*", help="extra trainer overrides for every run")
    args = ap.parse_args()

    _cli("teacher", "--config", args.config, "--no-progress", *args.overrides)
    rows = {}
    for layout in args.layouts:
        run = args.out / layout
        _cli("fit", "--config", args.config, "--run-dir", str(run), "--no-progress", *args.overrides,
             f"method.layout={layout}", "run.steps=1000000", f"run.max_train_s={args.budget_s}",
             f"run.val_every={args.val_every}", f"run.ckpt_every={10 * args.val_every}")
        rows[layout] = _records_of(run)

    teacher = next(r for r in rows[args.layouts[0]] if r.get("kind") == "teacher")
    nfes = sorted(int(k.split("nfe")[1]) for k in next(r for r in rows[args.layouts[0]] if r.get("kind") == "val")
                  if k.startswith("val/fd_nfe"))
    print(f"\nteacher: {teacher['teacher/steps']}-step Euler at CFG {teacher['teacher/cfg_scale']}: "
          f"FD {teacher['teacher/fd']:.3f}; its own Euler FD at 1/2/4 steps: "
          f"{teacher['teacher/fd_euler1']:.3f} / {teacher['teacher/fd_euler2']:.3f} / {teacher['teacher/fd_euler4']:.3f}")
    for layout, recs in rows.items():
        print(f"\n### {layout}\n")
        print("| step | train s | " + " | ".join(f"FD@{n}" for n in nfes) + " | FD@1 / teacher | val loss |")
        print("|---|---|" + "---|" * len(nfes) + "---|---|")
        for r in recs:
            if r.get("kind") != "val":
                continue
            fds = [r[f"val/fd_nfe{n}"] for n in nfes]
            print(f"| {r['step']} | {r['time/train_s']:.0f} | " + " | ".join(f"{v:.3f}" for v in fds)
                  + f" | {fds[0] / teacher['teacher/fd']:.3f} | {r['val/loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
