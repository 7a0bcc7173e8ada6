"""The harness's commands (``grid run``, ``grid status``, ``grid collect``, ``grid plan``, ``search``)
and the command-line machinery ``twinflow_lab.cli`` builds the ``twinflow-lab`` command from.

Commands live in ``COMMANDS``: a space-separated command path -> either a
``Command`` or the name of a harness module that defines ``HELP: str``,
``add_arguments(parser)`` and ``run(args) -> int`` (imported only when the parser is
built). The harness knows nothing of the packages above it: the ``twinflow-lab``
table adds ``report``. ``python -m harness.cli`` runs the harness's commands alone.

Exit codes: 0 success; 2 bad matrix file or usage; 3 the grid ran but some run
failed or diverged; 1 the grid could not run (a changed run, a failed teacher);
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from twinflow_train.config import Config, to_dict
from twinflow_train.inputs import deep_merge, from_dict, parse_overrides
from twinflow_train.rundir import RESTART_FLAG
from twinflow_train.yamlio import InputError, dir_problem, reading_input

from .launchers import add_launcher_arguments, make_launcher, parse_launcher_params


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(f"twinflow-lab: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- grid commands


def _matrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="ablation matrix YAML (e.g. ablations/blog-digits.yaml)")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where grids live: ROOT/<grid>/<arm>/seed-<k>/ "
                   "(default: ./runs)")


def _load(args: argparse.Namespace, problems: list[str] | None = None) -> Any:
    """The grid of ``args.file``; ``problems`` (the command's own argument checks) are reported with the matrix's."""
    from .matrix import MatrixError, load_matrix  # lazy: the matrix brings pandas and scipy, start-up does not

    problems = list(problems or [])
    if (problem := dir_problem(args.root)) is not None:
        problems.append(f"--root: {problem}")
    with reading_input("twinflow-lab"):
        try:
            grid = load_matrix(args.file, root=args.root)
        except MatrixError as e:
            problems += e.problems
    if problems:
        raise MatrixError(problems)
    return grid


def grid_run_args(p: argparse.ArgumentParser) -> None:
    _matrix_args(p)
    p.add_argument("--workers", type=int, default=1, help="runs in flight at once (local: the cores are divided "
                   "between them)")
    add_launcher_arguments(p)
    p.add_argument("--retries", type=int, default=0, help="start a failed run again up to this many times "
                   "(counted over every invocation; diverged runs are final)")
    p.add_argument("--dry-run", action="store_true", help="validate every run (plan, paths, weights, reward: the "
                   "trainer's preflight) and print what would be launched; writes nothing, trains nothing")
    p.add_argument(RESTART_FLAG, action="store_true", help="a run whose checkpoints all fail to verify "
                   "starts again from step 0 (default: it fails, naming them)")
    p.add_argument("--no-forks", action="store_true", help="train every run from step 0, even where its arm "
                   "shares first steps with another arm (forks give bit-identical runs; this is for comparison)")
    p.add_argument("--supersede-changed", action="store_true", help="a run whose config or trainer code changed: "
                   "move its old directory to <grid>/.superseded/ and start it fresh (default: refuse)")


def grid_run(args: argparse.Namespace) -> int:
    from .grid import run_grid  # lazy: the grid brings pandas and scipy, start-up does not

    problems = []
    if args.workers < 1:
        problems.append(f"--workers must be >= 1 (got {args.workers})")
    if args.retries < 0:
        problems.append(f"--retries must be >= 0 (got {args.retries})")
    params: dict[str, Any] = {}
    try:
        params = parse_launcher_params(args)
    except InputError as e:
        problems += e.problems
    grid = _load(args, problems)
    if args.dry_run:
        return _dry_run(grid, retries=args.retries)
    with reading_input("twinflow-lab grid run: launcher"):  # e.g. submitit missing, an unknown --slurm-param
        launcher = make_launcher(args.launcher, workers=args.workers, grid_dir=grid.grid_dir,
                                 nproc_per_node=args.nproc_per_node, slurm_cluster=args.slurm_cluster,
                                 slurm_parameters=params, accelerate_config=args.accelerate_config)
    result = run_grid(grid, launcher=launcher, retries=args.retries,
                      on_changed="supersede" if args.supersede_changed else "error",
                      restart_on_corrupt=args.restart_on_corrupt, forks=not args.no_forks)
    return result.exit_code


def _dry_run(grid: Any, *, retries: int) -> int:
    """Exit 0 when every run that would launch passes preflight, 2 otherwise (each problem printed)."""
    from .grid import dry_run_grid  # lazy: the grid brings pandas and scipy, start-up does not

    checks = dry_run_grid(grid, retries=retries)
    width = max(len(c.key) for c in checks)
    for c in checks:
        print(f"{c.key:<{width}}  {c.action:<9}  {'ok' if c.problem is None else 'PROBLEM: ' + c.problem}")
    bad = [c for c in checks if c.problem is not None]
    print(f"grid {grid.name}: {len(checks)} runs checked, {len(bad)} with problems (dry run: nothing written)")
    for line in plan_lines(grid):
        print(line)
    return 2 if bad else 0


def plan_lines(grid: Any) -> list[str]:
    """What the grid computes: runs and training steps at its first wave and at its maximum (a sequential plan),
    and the GPU-hours of arms whose model family has an estimate (``harness.cost``)."""
    # lazy: the forks and the cost (of the matrix) bring pandas and scipy; start-up stays free of them
    from .cost import grid_cost
    from .forks import describe, plan_forks

    with_forks, without = grid_cost(grid)
    out = [f"fork: {line}" for line in describe(plan_forks(grid))] + with_forks.lines()
    if without is not None:
        out += without.lines()
        if with_forks.most.gpu_hours is not None:
            out.append(f"  forks save ~{without.most.gpu_hours - with_forks.most.gpu_hours:,.0f} GPU-hours at the "
                       f"maximum ({without.most.steps - with_forks.most.steps:,} steps)")
    return out


def grid_status_args(p: argparse.ArgumentParser) -> None:
    _matrix_args(p)
    p.add_argument("--workers", type=int, default=None, help="runs in flight, for the ETA (default: the running "
                   "harness's, else 1)")


def grid_status(args: argparse.Namespace) -> int:
    from .lock import grid_is_live, lock_info  # lazy: the lock (runs, matrix) brings pandas and scipy
    from .monitor import GridMonitor, render_table  # lazy: ~7 ms (statistics, the store) start-up does not pay

    problems = [f"--workers must be >= 1 (got {args.workers})"] if args.workers is not None and args.workers < 1 else []
    grid = _load(args, problems)
    live = grid_is_live(grid.grid_dir)
    info = lock_info(grid.grid_dir) if live else None
    slots = args.workers or (int(info.get("slots", 1)) if info else 1)
    monitor = GridMonitor([(s.arm, s.seed, s.run_dir, s.config.run.steps) for s in grid.runs])
    who = f"running (harness pid {info.get('pid')}, {info.get('launcher')})" if info else "no harness running"
    rows = monitor.rows(harness_live=live)
    if grid.plan is not None:  # a sequential grid: the runs of its waves so far, then where its claims stand
        from .sequential import status_lines  # lazy: brings pandas and scipy

        rows = [r for r in rows if r.state != "new"]
    print(render_table(rows, slots=slots, title=f"grid {grid.name} ({who})"))
    if grid.plan is not None:
        print("\n".join(status_lines(grid.grid_dir, grid.claims, grid.plan)))
    return 0


def grid_collect_args(p: argparse.ArgumentParser) -> None:
    _matrix_args(p)
    p.add_argument("--rise-k", type=int, default=3, help="validation rises in a row that flag over-fitting")


def grid_collect(args: argparse.Namespace) -> int:
    # lazy: pandas; start-up stays free of it
    import pandas as pd

    from .collect import collect_grid, divergence_summary, publish_parquet, run_statuses  # lazy: pandas

    grid = _load(args, [f"--rise-k must be >= 1 (got {args.rise_k})"] if args.rise_k < 1 else [])
    if not grid.grid_dir.is_dir():
        _err(f"grid {grid.name} has no runs yet ({grid.grid_dir} does not exist)")
        return 1
    df = collect_grid(grid.grid_dir, on_bad_line="skip")  # a damaged file marks its run, not the whole grid
    parquet = publish_parquet(grid.grid_dir)
    summary = divergence_summary(df, rise_k=args.rise_k)
    statuses = run_statuses(grid.grid_dir)
    table = statuses[["arm", "seed", "state", "step", "reason"]].merge(
        summary.drop(columns=["grid", "run_dir", "val_rise_k"]), on=["arm", "seed"], how="left")
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(f"{len(df)} records from {df['run_dir'].nunique() if len(df) else 0} runs -> "
              f"{parquet}")
        print(table.to_string(index=False))
    problems = dict(df.attrs.get("problems", {}))
    for run_dir, problem in zip(statuses["run_dir"], statuses["problem"]):
        if problem and run_dir not in problems:
            problems[run_dir] = problem
    for run_dir, problem in problems.items():
        print(f"problem in {Path(run_dir).parent.name}/{Path(run_dir).name}: {problem} (its other records are shown)")
    return 0


def grid_plan_args(p: argparse.ArgumentParser) -> None:
    from twinflow_train.run.plan import add_plan_arguments  # lazy: the memory plan brings torch

    _matrix_args(p)
    add_plan_arguments(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every arm, e.g. --set data.batch_size=32 (repeatable)")


def grid_plan(args: argparse.Namespace) -> int:
    """The memory plan of every arm (one seed each: seeds do not change memory); exit 3 when one does not fit."""
    from twinflow_train.run.plan import plan_from_args  # lazy: the memory plan brings torch

    grid = _load(args)
    plans, seen = {}, set()
    for spec in grid.runs:
        if spec.arm in seen:
            continue
        seen.add(spec.arm)
        try:
            cfg = spec.config
            if args.overrides:
                cfg = from_dict(Config, deep_merge(to_dict(cfg), parse_overrides(args.overrides)))
            plans[spec.arm] = plan_from_args(cfg, args)
        except ValueError as e:
            _err(f"arm '{spec.arm}': {e}")
            return 2
    if args.json:
        print(json.dumps({arm: p.as_dict() for arm, p in plans.items()}, indent=1))
    else:
        for arm, p in plans.items():
            print(f"== {grid.name} / {arm}\n{p.table()}\n")
        width = max(len(a) for a in plans)
        print(f"{'arm':<{width}}  {'GiB/rank':>9}  {'budget':>7}  {'binding phase':<14}  fits")
        for arm, p in plans.items():
            print(f"{arm:<{width}}  {p.total / 2**30:>9.1f}  {p.budget / 2**30:>7.1f}  "
                  f"{p.binding.replace(' ', '-'):<14}  {'yes' if p.fits else 'NO'}")
        print()
        for line in plan_lines(grid):  # what the grid computes, and what its forks save
            print(line)
    return 0 if all(p.fits for p in plans.values()) else 3


COMMANDS: dict[str, Command | str] = {
    "grid run": Command("launch every run of a matrix that is not done (resumes, retries, skips)",
                        grid_run_args, grid_run),
    "grid status": Command("table of a grid's runs: state, step, last grad norm and val loss, ETA",
                           grid_status_args, grid_status),
    "grid collect": Command("gather every run's metrics into Parquet and print the divergence summary",
                            grid_collect_args, grid_collect),
    "grid plan": Command("per-rank GPU memory of every arm (Qwen-Image; meta tensors, no GPU) and whether it fits",
                         grid_plan_args, grid_plan),
    "search": "harness.search",
}


def _resolve(entry: Command | str) -> Command:
    if isinstance(entry, Command):
        return entry
    mod = importlib.import_module(entry)
    return Command(getattr(mod, "HELP", mod.__doc__ or ""), mod.add_arguments, mod.run)


def build_parser(commands: Mapping[str, Command | str] = COMMANDS, *, prog: str = "twinflow-lab",
                 description: str = "Ablation grids and searches for TwinFlow distillation.",
                 ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    tree: dict[tuple[str, ...], Any] = {(): parser.add_subparsers(dest="cmd0", required=True, metavar="COMMAND")}
    for path, entry in commands.items():
        parts = tuple(path.split())
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            if prefix not in tree:
                sub = tree[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                tree[prefix] = sub.add_subparsers(dest=f"cmd{depth}", required=True, metavar="COMMAND")
        command = _resolve(entry)
        p = tree[parts[:-1]].add_parser(parts[-1], help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def run_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with a ``build_parser`` parser and run the command; the exit status (see the module
    docstring): 2 for what the user gave, 1 for a grid that cannot run, 130 when interrupted."""
    from .grid import GridError, GridInterrupted  # lazy: the grid brings pandas and scipy

    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except InputError as e:  # what the user gave; anything else is an internal error and keeps its traceback
        for problem in e.problems:
            _err(problem)
        return 2
    except GridError as e:
        for problem in e.problems:
            _err(problem)
        return 1
    except (KeyboardInterrupt, GridInterrupted) as e:
        _err(f"interrupted ({e or 'Ctrl-C'}); the runs in flight were stopped; re-run the same command to resume")
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
