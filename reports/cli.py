"""``twinflow-lab report GRID_DIR``: the arguments and the run of the command (``twinflow_lab.cli`` registers it).

``--claims MATRIX`` needs the matrix loader, which belongs to the harness: the command table,
which sits above both packages, passes it in as ``load_claims``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from twinflow_train.rundir import RunDirError
from twinflow_train.yamlio import InputError, dir_problem, reading_input

if TYPE_CHECKING:
    from harness.claims import Claim

ClaimsLoader = Callable[[Path], "tuple[Claim, ...]"]
"""Matrix file -> its claims, validated with the whole matrix; raises ``InputError`` naming file and key."""

BANDS = ("minmax", "ci95")  # reports.plots.BANDS, repeated so that building the parser imports no matplotlib
HELP = "comparison report of a grid: report.html (self-contained) and report.md with PNGs"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid_dir", type=Path, metavar="GRID_DIR", help="grid directory (runs/<grid>)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: GRID_DIR/report)")
    parser.add_argument("--baseline", default=None, help="arm the differences are taken against (default: first arm)")
    parser.add_argument("--arm-order", nargs="+", default=None, metavar="ARM",
                        help="ladder order of the arms (default: the matrix order)")
    parser.add_argument("--band", choices=BANDS, default="minmax",
                        help="seed band of the curves: min-max over seeds, or 95%% t-interval of the mean")
    parser.add_argument("--max-points", type=int, default=400, help="step bins per curve (default 400)")
    parser.add_argument("--nfe", type=int, default=None, help="NFE of reward/accuracy in the summary (default 2)")
    parser.add_argument("--sample-seed", type=int, default=None, help="run seed shown in the sample grid")
    parser.add_argument("--study-storage", default=None, metavar="PATH|URL",
                        help="Optuna study storage for the study section: a journal file or an SQLAlchemy URL "
                             "(default: the *.journal files at the top of GRID_DIR)")
    parser.add_argument("--study-name", default=None, help="only this study of --study-storage")
    parser.add_argument("--claims", type=Path, default=None, metavar="MATRIX",
                        help="judge the claims of this matrix file (default: the claims of the matrix the runs "
                             "were made from)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _argument_problems(args: argparse.Namespace) -> list[str]:
    """The command's own arguments, checked before the grid is read (reading it caches its metrics)."""
    # lazy: the spec's matrix brings pandas and scipy, the parser does not
    from harness.search_spec import storage_problem

    problems = []
    if not args.grid_dir.is_dir():
        problems.append(f"GRID_DIR: {args.grid_dir} " + ("is not a directory" if args.grid_dir.exists()
                                                         else "does not exist"))
    if args.out is not None and (problem := dir_problem(args.out)) is not None:
        problems.append(f"--out: {problem}")
    if args.max_points < 10:
        problems.append(f"--max-points must be >= 10 (got {args.max_points})")
    if args.nfe is not None and args.nfe < 1:
        problems.append(f"--nfe must be >= 1 (got {args.nfe})")
    if args.study_name is not None and args.study_storage is None:
        problems.append("--study-name needs --study-storage")
    if args.study_storage is not None and (problem := storage_problem(args.study_storage,
                                                                      must_exist=True)) is not None:
        problems.append(f"--study-storage: {problem}")
    return problems


def run_report(args: argparse.Namespace, *, load_claims: ClaimsLoader) -> int:
    """Write the report of ``args.grid_dir``; exit 0, or 2 (each problem printed) when the arguments, the grid's
    data or the ``--claims`` matrix cannot make one."""
    try:
        with reading_input("twinflow-lab report"):
            problems = _argument_problems(args)
            if problems:
                raise InputError(problems)
            from .data import load_grid  # lazy: the grid's tables bring pandas

            data = load_grid(grid_dir=args.grid_dir, arm_order=args.arm_order)
            if args.baseline is not None and args.baseline not in data.arms:
                raise InputError(f"--baseline: arm {args.baseline!r} is not in the grid; arms: {list(data.arms)}")
            if args.study_storage is not None:
                from .study import load_studies  # lazy: the study section brings matplotlib

                studies = load_studies(args.study_storage, name=args.study_name)
            else:
                from .study import find_studies  # lazy: the study section brings matplotlib

                studies = find_studies(args.grid_dir)
            claims, source = None, ""
            if args.claims is not None:
                claims, source = load_claims(args.claims), f"matrix file {args.claims}"
        from .build import write_report  # lazy: the report brings matplotlib

        # a run's sample files that do not load are problems of the grid's data, found while writing
        path = write_report(data, out_dir=args.out if args.out is not None else args.grid_dir / "report",
                            baseline=args.baseline, band=args.band, max_points=args.max_points, primary_nfe=args.nfe,
                            sample_seed=args.sample_seed, studies=studies, claims=claims, claims_source=source,
                            progress=not args.no_progress)
    except (InputError, RunDirError, FileNotFoundError) as e:  # arguments, grid data, damaged run files
        for problem in getattr(e, "problems", None) or str(e).splitlines():
            print(f"twinflow-lab report: {problem}", file=sys.stderr)
        return 2
    print(path)
    return 0
