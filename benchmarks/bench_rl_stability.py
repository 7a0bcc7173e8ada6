"""Reward guidance on digits: grad-norm behaviour at the RL switch-on, and what RL buys.

Five runs from the same teacher and seed:
  tf-only         TwinFlow alone
  rl-moderate     + RL (hard switch at --warmup) at --moderate weight
  high-hard       + RL at --high weight, hard switch at --warmup
  high-sigmoid    + RL at --high weight, sigmoid ramp centred at --warmup
  high-clip       + RL at --high weight, hard switch, parameter-space RL clipping

Prints the pre-clip grad norm just before and after the switch-on (median of the
logged steps in a window each side, and the max), the per-term norms, and the
final 2-NFE reward / FD / accuracy of each run.

    python benchmarks/bench_rl_stability.py --steps 1500 --warmup 500 --out runs/bench-rl
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twinflow_train.rundir import iter_metrics

REPO = Path(__file__).resolve().parents[1]


def _records_of(run_dir: Path) -> list[dict]:
    return list(iter_metrics(run_dir / "metrics.jsonl"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "digits.yaml"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--moderate", type=float, default=0.05)
    ap.add_argument("--high", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=100, help="steps each side of the switch-on")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-rl")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    rl = ["rl.enabled=true", "rl.reward=digits", f"rl.warmup={args.warmup}"]
    arms = {
        "tf-only": [],
        "rl-moderate": rl + [f"rl.weight={args.moderate}", "rl.schedule=hard"],
        "high-hard": rl + [f"rl.weight={args.high}", "rl.schedule=hard"],
        "high-sigmoid": rl + [f"rl.weight={args.high}", "rl.schedule=sigmoid", f"rl.center={args.warmup}",
                              f"rl.width={max(1, args.warmup // 10)}"],
        "high-clip": rl + [f"rl.weight={args.high}", "rl.schedule=hard", "rl.clip=param", "rl.clip_norm=0.5"],
    }
    base = ["--config", args.config, "--no-progress", *args.overrides, f"run.steps={args.steps}", "run.log_every=5",
            f"run.val_every={args.steps}", f"run.ckpt_every={args.steps}"]
    subprocess.run([sys.executable, "-m", "twinflow_train.cli", "teacher", "--config", args.config, "--no-progress",
                    *args.overrides], check=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.workers)))

    def launch(name: str) -> int:
        cmd = [sys.executable, "-m", "twinflow_train.cli", "fit", "--run-dir", str(args.out / name), *base, *arms[name]]
        return subprocess.run(cmd, env=env, capture_output=True, text=True).returncode

    with ThreadPoolExecutor(args.workers) as pool:
        codes = dict(zip(arms, pool.map(launch, arms)))
    print(f"\nexit codes: {codes}\n")
    print("| run | median norm before | median norm after | max after | max grad_norm/rl after | "
          "cos(tw, rl) after | reward@2 | FD@2 | accuracy@2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    w = args.warmup
    for name in arms:
        recs = _records_of(args.out / name)
        train = [r for r in recs if r.get("kind") == "train"]
        before = [r["grad_norm/max"] for r in train if w - args.window <= r["step"] < w]
        after = [r["grad_norm/max"] for r in train if w <= r["step"] < w + args.window]
        rl_after = [r["grad_norm/rl"] for r in train if w <= r["step"] < w + args.window and "grad_norm/rl" in r]
        cos_after = [r["grad_cos/twinflow_rl"] for r in train if w <= r["step"] < w + args.window
                     and "grad_cos/twinflow_rl" in r]
        val = [r for r in recs if r.get("kind") == "val"][-1]
        fmt = lambda xs, f: f"{f(xs):.3f}" if xs else "n/a"  # noqa: E731
        print(f"| {name} | {fmt(before, statistics.median)} | {fmt(after, statistics.median)} | {fmt(after, max)} | "
              f"{fmt(rl_after, max)} | {fmt(cos_after, statistics.median)} | {val['val/reward_nfe2']:.3f} | "
              f"{val['val/fd_nfe2']:.3f} | {val['val/accuracy_nfe2']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
