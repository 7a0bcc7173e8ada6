"""``twinflow-lab report GRID_DIR``: the argparse hook the twinflow-lab CLI registers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    parser.add_argument("--bootstrap", type=int, default=10_000, metavar="N",
                        help="bootstrap resamples (default 10000)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--max-points", type=int, default=400, help="step bins per curve (default 400)")
    parser.add_argument("--nfe", type=int, default=None, help="NFE of reward/accuracy in the summary (default 2)")
    parser.add_argument("--sample-seed", type=int, default=None, help="run seed shown in the sample grid")
    parser.add_argument("--study-storage", default=None, metavar="PATH|URL",
                        help="Optuna study storage for the study section: a journal file or an SQLAlchemy URL "
                             "(default: the *.journal files at the top of GRID_DIR)")
    parser.add_argument("--study-name", default=None, help="only this study of --study-storage")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_report(args: argparse.Namespace) -> int:
    from .build import build_report

    try:
        studies = None
        if args.study_storage is not None:
            from .study import load_studies

            studies = load_studies(args.study_storage, name=args.study_name)
        elif args.study_name is not None:
            raise ValueError("--study-name needs --study-storage")
        path = build_report(grid_dir=args.grid_dir, out_dir=args.out, baseline=args.baseline, arm_order=args.arm_order,
                            band=args.band, n_boot=args.bootstrap, boot_seed=args.bootstrap_seed,
                            max_points=args.max_points, primary_nfe=args.nfe, sample_seed=args.sample_seed,
                            studies=studies, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"twinflow-lab report: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description="Comparison report of a grid directory.")
    add_report_arguments(parser)
    return run_report(parser.parse_args(argv))


# the twinflow-lab command table takes a module with HELP, add_arguments and run
add_arguments = add_report_arguments
run = run_report
