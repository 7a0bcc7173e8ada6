"""Kill soak: SIGKILL a running grid at seeded random moments, re-run it after each, check the end state.

A tiny grid (2 arms x 1 seed of the digits trainer) is run once uninterrupted
(the reference), then again in a fresh directory where each invocation of
``twinflow-lab grid run`` is killed with SIGKILL (its whole process group:
harness and trainers) after a random delay, and started again. After the last
kill the grid runs to its end. Checked at the end:

- every run is ``done``;
- each run's metrics.jsonl reads strictly and logs every training step
  1..steps exactly once (no duplicated, no missing step), each (step, kind) once;
- no trainer process outlived a kill;
- the final weights (student and EMA target) equal the reference grid's to 1e-6.

The moments are drawn (seeded) so that every kill lands while the grid runs: with
probability 1/4 a kill in start-up, at a uniform fraction of the shortest start-up
seen so far (the harness preparing the teacher, a trainer importing, building,
verifying and loading its checkpoint); else a kill while training, once the runs
have logged a uniform 1..``--max-new`` new steps in all, plus a uniform 0-0.3 s
(mid-step, around a checkpoint, between a log and a checkpoint).

    python benchmarks/bench_kill_soak.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from harness.monitor import pid_is_trainer  # noqa: E402
from twinflow_train import rundir  # noqa: E402

BASE = """\
run: {steps: STEPS, log_every: 1, val_every: 20, ckpt_every: 5, threads: 1}
data: {batch_size: 32}
codec: {steps: 60, hidden: 16}
aux: {reward_steps: 60, eval_steps: 60}
model: {hidden: 64, depth: 2, time_dim: 16}
teacher: {steps: 60, batch_size: 64, sample_steps: 4}
eval: {n_samples: 20, nfe: [1]}
"""
MATRIX = """\
name: soak
base: base.yaml
seeds: [0]
arms:
  plain: {}
  rect: {method.rect_weight: 0.5}
"""


def _grid(matrix: Path, root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness.cli", "grid", "run", str(matrix), "--root", str(root),
                             "--workers", "2"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _runs(root: Path) -> list[Path]:
    return sorted((root / "soak").glob("*/seed-0"))


def _train_steps(run: Path) -> int:
    return sum(1 for r in rundir.read_metrics(run / "metrics.jsonl").records if r.get("kind") == "train")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=True)
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for name, sd in state["extra"].items():
        out.update({f"{name}.{k}": v for k, v in sd.items()})
    return out


def _check_metrics(run: Path, steps: int) -> tuple[int, int]:
    """(duplicated, missing) training steps; raises on a line that does not parse."""
    records = rundir.read_metrics(run / "metrics.jsonl").records  # strict
    keys = [(r["step"], r["kind"]) for r in records if r.get("kind") != "event"]
    assert len(keys) == len(set(keys)), f"{run}: a (step, kind) appears twice"
    train = [r["step"] for r in records if r.get("kind") == "train"]
    return len(train) - len(set(train)), len(set(range(1, steps + 1)) - set(train))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-new", type=int, default=20, help="most new logged steps (both runs) before a kill")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="kill-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "base.yaml").write_text(BASE.replace("STEPS", str(args.steps)))
    matrix = work / "soak.yaml"
    matrix.write_text(MATRIX)
    env = dict(os.environ, PYTHONPATH=str(REPO), TWINFLOW_LAB_CACHE=str(work / "cache"), WANDB_MODE="disabled")

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "twinflow_train.cli", "teacher", "--config", str(work / "base.yaml"),
                    "--no-progress"], cwd=REPO, env=env, check=True, capture_output=True)
    teacher_s = time.perf_counter() - t0

    # reference: one uninterrupted invocation; its first training record times the start-up
    clean = work / "clean"
    t0 = time.perf_counter()
    proc = _grid(matrix, clean, env)
    startup = None
    while proc.poll() is None:
        if startup is None and any(_train_steps(r) for r in _runs(clean)):
            startup = time.perf_counter() - t0
        time.sleep(0.05)
    reference_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    startup = startup or reference_s

    rng = random.Random(args.seed)
    soak = work / "soak-runs"
    kills, t_soak, startups = [], time.perf_counter(), [startup]
    for i in range(args.kills):
        in_startup = rng.random() < 0.25
        fraction, new_steps, jitter = rng.random(), rng.randint(1, args.max_new), rng.uniform(0.0, 0.3)
        before = {r.parent.name: _train_steps(r) for r in _runs(soak)}
        proc = _grid(matrix, soak, env)
        t0 = time.perf_counter()
        first_step, trigger = None, (min(startups) * fraction if in_startup else None)
        while proc.poll() is None:
            now = time.perf_counter() - t0
            if trigger is not None and now >= trigger:
                break
            logged = sum(_train_steps(r) - before.get(r.parent.name, 0) for r in _runs(soak))
            if logged > 0 and first_step is None:
                first_step = now
                startups.append(now)
            if trigger is None and logged >= new_steps:
                trigger = now + jitter
            time.sleep(0.02)
        delay = time.perf_counter() - t0
        landed = proc.poll() is None
        if landed:
            os.killpg(proc.pid, signal.SIGKILL)  # harness and trainers at once
        proc.wait()
        time.sleep(0.3)
        survivors = [r for r in _runs(soak) if (st := rundir.read_status(r)) and pid_is_trainer(st.get("pid"))
                     and st["state"] == "running"]
        assert not survivors, f"kill {i + 1}: a trainer outlived the kill: {survivors}"
        after = {r.parent.name: _train_steps(r) for r in _runs(soak)}
        kills.append({"delay_s": round(delay, 2), "landed": landed, "in_startup": in_startup,
                      "steps_logged": {k: (before.get(k, 0), v) for k, v in after.items()},
                      "checkpoints": {r.parent.name: rundir.resume_step(r) for r in _runs(soak)}})
        print(f"kill {i + 1:2d} after {delay:5.2f}s {'in start-up' if in_startup else 'training'}"
              f"{' (grid had ended)' if not landed else ''}"
              f" logged steps {after} checkpoints {kills[-1]['checkpoints']}", flush=True)
    proc = _grid(matrix, soak, env)
    proc.wait()
    assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
    soak_s = time.perf_counter() - t_soak

    worst, dup, miss, attempts = 0.0, 0, 0, {}
    for run in _runs(soak):
        assert rundir.read_status(run)["state"] == "done", run
        d, m = _check_metrics(run, args.steps)
        dup, miss = dup + d, miss + m
        ref = clean / "soak" / run.parent.name / "seed-0"
        a, b = _weights(ref), _weights(run)
        assert a.keys() == b.keys()
        worst = max([worst] + [float((a[k].double() - b[k].double()).abs().max()) for k in a])
        record = rundir.read_json(run / "harness.json")
        attempts[run.parent.name] = [x["outcome"] for x in record["attempts"]]
    landed = sum(k["landed"] for k in kills)
    in_startup = sum(1 for k in kills if k["landed"] and all(a == b for a, b in k["steps_logged"].values()))
    result = {"kills": args.kills, "landed": landed, "landed_before_any_new_step": in_startup, "seed": args.seed,
              "steps": args.steps, "teacher_s": round(teacher_s, 1), "reference_grid_s": round(reference_s, 1),
              "startup_s": round(startup, 1), "soak_s": round(soak_s, 1), "duplicated_steps": dup,
              "missing_steps": miss, "max_abs_weight_diff": worst, "attempts": attempts}
    print(json.dumps(result, indent=1))
    ok = dup == 0 and miss == 0 and worst <= 1e-6
    print(f"\n| kills (landed while running) | runs done | duplicated / missing steps | max weight diff vs "
          f"uninterrupted | soak wall | uninterrupted grid |\n|---|---|---|---|---|---|\n"
          f"| {args.kills} ({landed}; {in_startup} before a new step was logged) | {len(attempts)}/{len(attempts)} "
          f"| {dup} / {miss} | {worst:.1e} | {soak_s:.0f} s | {reference_s:.0f} s |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
