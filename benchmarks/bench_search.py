"""Search benchmark: what the search itself costs per trial, and how fast a pruned run is stopped.

A scripted stand-in trainer (no torch: it reads the launch config, writes the run-directory
contract and sleeps) isolates the search's own work: asking and telling the journal,
preparing run directories, reading metrics, reporting to the pruner, writing results.

1. Overhead: ``--trials`` trials of about ``--run-s`` seconds on ``--workers`` workers
   (journal storage, no pruning). Figure: search wall time against the ideal (sum of the
   runs' own wall times from harness.json / workers), as milliseconds per trial.
   Target: < 5 % of a trial at ``--run-s 2``.
2. Prune reaction: trials worse than the first are pruned by the median pruner at their
   first evaluation. Figure: seconds from the stand-in writing that evaluation to the
   end of the stop (the attempt's end in harness.json, after the process group is gone).
   Target: <= 2 x ``--poll-s`` + 0.5 s.

    .venv/bin/python benchmarks/bench_search.py
    .venv/bin/python benchmarks/bench_search.py --trials 16 --workers 2 --run-s 2 --poll-s 0.5

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

from harness.launchers import LocalLauncher, available_cores  # noqa: E402
from harness.search import Search  # noqa: E402
from harness.search_spec import load_search_spec  # noqa: E402
from harness.store import read_metrics, read_record  # noqa: E402

STANDIN = """\
import json, math, os, sys, time
from pathlib import Path
import yaml
args = sys.argv[1:]
cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
d = Path(args[args.index("--run-dir") + 1])
from twinflow_train.rundir import write_status
def status(state, step=0):
    write_status(d, state, step=step)
w, n, every = cfg["rl"]["weight"], cfg["run"]["steps"], cfg["run"]["val_every"]
pause = float(os.environ["BENCH_RUN_S"]) / n
status("running")
with open(d / "metrics.jsonl", "a") as f:
    for step in range(1, n + 1):
        time.sleep(pause)
        f.write(json.dumps({"step": step, "kind": "train", "loss/total": 1.0, "grad_norm/total": 1.0}) + "\\n")
        if step % every == 0 or step == n:
            f.write(json.dumps({"step": step, "kind": "val", "val/fd_nfe1": abs(math.log10(w)) + 1.0 / step,
                                "time/written": time.time()}) + "\\n")
        f.flush()
status("done", n)
"""

BASE = "eval: {n_samples: 20, nfe: [1]}\nrl: {enabled: true, reward: digits}\n"


class StandInLauncher(LocalLauncher):
    def __init__(self, script: Path, *, workers: int):
        super().__init__(workers=workers, threads=1)
        self.script = script

    def command(self, job):
        return [sys.executable, str(self.script), *job.argv]


def _spec(dir_: Path, name: str, body: str) -> Path:
    (dir_ / "base.yaml").write_text(BASE)
    path = dir_ / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\nseeds: [0]\n"
                    "overrides: {run.steps: 20, run.val_every: 4, run.log_every: 1}\n"
                    "objective: {metric: val/fd_nfe1, direction: minimize}\n" + body)
    return path


def _search(path: Path, root: Path, script: Path, *, workers: int, poll_s: float) -> tuple[Search, float]:
    spec = load_search_spec(path)
    search = Search(spec, root=root, launcher=StandInLauncher(script, workers=workers), poll_s=poll_s,
                    progress=False, stream=io.StringIO(), prepare_teacher=False)
    t0 = time.perf_counter()
    result = search.run()
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"benchmark search did not finish cleanly:\n{search.stream.getvalue()}")
    return search, wall


def bench_overhead(args: argparse.Namespace, root: Path, script: Path) -> dict:
    path = _spec(root, "overhead", f"parameters: {{rl.weight: {{low: 1.0e-3, high: 1.0, log: true}}}}\n"
                                   f"trials: {args.trials}\nworkers: {args.workers}\n"
                                   "sampler: {kind: tpe, seed: 0, n_startup_trials: 4}\npruner: {kind: none}\n")
    search, wall = _search(path, root / "runs", script, workers=args.workers, poll_s=args.poll_s)
    runs = [a.ended - a.started for d in sorted((root / "runs" / "overhead").glob("trial-*/seed-0"))
            for a in read_record(d).attempts]
    ideal = sum(runs) / args.workers
    per_trial_ms = (wall - ideal) / args.trials * 1000
    return {"trials": args.trials, "workers": args.workers, "run_s_mean": statistics.mean(runs),
            "search_wall_s": wall, "ideal_wall_s": ideal, "overhead_ms_per_trial": per_trial_ms,
            "overhead_fraction_of_trial": per_trial_ms / 1000 / statistics.mean(runs)}


def bench_prune(args: argparse.Namespace, root: Path, script: Path) -> dict:
    n = max(3, args.trials // 2)
    enqueue = ", ".join(["{rl.weight: 1.0}"] + ["{rl.weight: 1.0e-3}"] * (n - 1))
    path = _spec(root, "prune", f"parameters: {{rl.weight: {{low: 1.0e-3, high: 1.0, log: true}}}}\n"
                                f"trials: {n}\nworkers: 1\npruner: {{kind: median, n_startup_trials: 1}}\n"
                                f"enqueue: [{enqueue}]\n")
    search, _ = _search(path, root / "runs", script, workers=1, poll_s=args.poll_s)
    reactions = []
    for t in search.study.get_trials(deepcopy=False):
        if t.state.name != "PRUNED":
            continue
        d = root / "runs" / "prune" / t.user_attrs["run_group"] / "seed-0"
        first = min(t.intermediate_values)
        written = next(r["time/written"] for r in read_metrics(d / "metrics.jsonl")
                       if r.get("kind") == "val" and r["step"] == first)
        reactions.append(read_record(d).attempts[-1].ended - written)
    if not reactions:
        raise SystemExit("no trial was pruned; the prune benchmark measured nothing")
    return {"pruned": len(reactions), "poll_s": args.poll_s, "reaction_s_median": statistics.median(reactions),
            "reaction_s_max": max(reactions)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--run-s", type=float, default=2.0, help="seconds each stand-in run lasts")
    p.add_argument("--poll-s", type=float, default=0.5, help="the search's --poll-s")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import os

    os.environ["BENCH_RUN_S"] = str(args.run_s)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        root = Path(tmp)
        script = root / "standin.py"
        script.write_text(STANDIN)
        over = bench_overhead(args, root, script)
        prune = bench_prune(args, root, script)
    cmd = f".venv/bin/python benchmarks/bench_search.py --trials {args.trials} --workers {args.workers} " \
          f"--run-s {args.run_s} --poll-s {args.poll_s}"
    print(f"Command: `{cmd}` ({platform.node()}, {available_cores()} cores, stand-in trainer)\n")
    print("| figure | value |\n|---|---|")
    print(f"| trials x workers | {over['trials']} x {over['workers']} |")
    print(f"| stand-in run wall time (mean) | {over['run_s_mean']:.2f} s |")
    print(f"| search wall / ideal (sum of runs / workers) | {over['search_wall_s']:.1f} s / "
          f"{over['ideal_wall_s']:.1f} s |")
    print(f"| search overhead per trial | {over['overhead_ms_per_trial']:.0f} ms "
          f"({100 * over['overhead_fraction_of_trial']:.1f} % of a trial) |")
    print(f"| prune reaction (evaluation written -> process group stopped), poll {prune['poll_s']} s | "
          f"median {prune['reaction_s_median']:.2f} s, max {prune['reaction_s_max']:.2f} s "
          f"({prune['pruned']} pruned trials) |")
    if args.json:
        args.json.write_text(json.dumps({"overhead": over, "prune": prune}, indent=1))


if __name__ == "__main__":
    main()
