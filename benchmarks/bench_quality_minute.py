"""Quality per minute: the committed digits run, with and without the evaluation EMA.

Each arm is ``twinflow-train fit --config CONFIG`` as committed (its ``run.steps`` and
``run.val_every``; its 2,400 steps are about two minutes of one core on a quiet machine),
with ``eval.n_samples`` raised for steadier FD, one thread, in its own subprocess; arms
run ``--parallel`` at a time. Reported per arm, from its ``metrics.jsonl``: the teacher's
28-step FD (same noise and prompts), the *final* validation's FD at 1 and 2 NFE and
their ratio to the teacher's, the change of FD@1 between the last two validations, the
steps done and the training seconds (``time/train_s``, wall clock: inflated on a loaded
machine, so the load average at the start is printed too).

    python benchmarks/bench_quality_minute.py [--ema 0 0.995 0.998] [--n-samples 2000] [--parallel 2]
        [--variant NAME KEY=VALUE ...] [--seeds 0 1]

``--variant`` (repeatable) adds arms with extra overrides beside the committed config (e.g.
``--variant bf16 parallel.fsdp=never parallel.mixed_precision=bf16``); with variants the
committed config itself is the arm ``committed``. ``--seeds`` repeats every arm per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarise(run_dir: Path) -> dict:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    teacher = next(r for r in recs if r["kind"] == "teacher")["teacher/fd"]
    vals = [r for r in recs if r["kind"] == "val"]
    last, prev = vals[-1], vals[-2]
    out = {"teacher_fd28": teacher, "steps": last["step"], "train_s": last["time/train_s"],
           "val_steps": [r["step"] for r in vals],
           "fd1": [round(r["val/fd_nfe1"], 2) for r in vals], "fd2": [round(r["val/fd_nfe2"], 2) for r in vals]}
    out.update({"final_fd1": last["val/fd_nfe1"], "final_fd2": last["val/fd_nfe2"],
                "fd1_over_teacher": last["val/fd_nfe1"] / teacher, "fd2_over_teacher": last["val/fd_nfe2"] / teacher,
                "fd1_change_last_two": (last["val/fd_nfe1"] - prev["val/fd_nfe1"]) / prev["val/fd_nfe1"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.yaml")
    p.add_argument("--ema", type=float, nargs="+", default=[0.0, 0.995, 0.998], help="eval.ema_decay per arm (0: off)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--out", type=Path, default=None, help="keep the run directories here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="an arm beside the committed config: its name, then its overrides (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run.seed values (default: the config's)")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-qpm-") as tmp:
        root = args.out or Path(tmp)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        variants = [("committed", [])] + [(v[0], v[1:]) for v in args.variant]
        seeds = args.seeds or [None]
        todo = []
        for name, extra in variants if args.variant else variants[:1]:
            for decay in args.ema:
                for seed in seeds:
                    label = f"eval.ema_decay={decay}" + (f" {name}" if args.variant else "") + (
                        "" if seed is None else f" run.seed={seed}")
                    todo.append((label, [f"eval.ema_decay={decay}", *extra] + ([] if seed is None else
                                                                              [f"run.seed={seed}"])))
        results: dict[str, dict] = {}
        while todo:
            batch, todo = todo[:args.parallel], todo[args.parallel:]
            procs = []
            for label, over in batch:
                run_dir = root / label.replace(" ", "_").replace("=", "-")
                cmd = [sys.executable, "-m", "twinflow_train.cli", "fit", "--no-progress", "--config", str(args.config),
                       "--run-dir", str(run_dir), "run.threads=1", f"eval.n_samples={args.n_samples}",
                       *args.override, *over]
                procs.append((label, run_dir, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                                stderr=subprocess.PIPE, text=True)))
            for label, run_dir, proc in procs:
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise SystemExit(f"bench_quality_minute: arm {label} failed:\n{err[-3000:]}")
                results[label] = summarise(run_dir)
                print(f"{label}:", json.dumps(results[label]), flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
