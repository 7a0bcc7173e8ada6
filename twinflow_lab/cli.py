"""``twinflow-lab``: the harness's commands (grids, searches) and the comparison report, in one table.

``COMMANDS`` maps a space-separated command path to a ``harness.cli.Command`` (or the
name of a harness module with ``HELP``, ``add_arguments`` and ``run``). Exit codes are
those of ``harness.cli``; ``report`` exits 0, or 2 when its input cannot make a report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import cli as harness_cli
from harness.cli import Command
from reports import cli as report_cli


def _matrix_claims(path: Path) -> tuple:
    """The claims of a matrix file, validated with the whole matrix (``harness.matrix``)."""
    from harness.matrix import load_matrix  # lazy: the matrix brings pandas and scipy, start-up does not

    return load_matrix(path).claims


def _report(args: argparse.Namespace) -> int:
    return report_cli.run_report(args, load_claims=_matrix_claims)


COMMANDS: dict[str, Command | str] = {
    **harness_cli.COMMANDS,
    "report": Command(report_cli.HELP, report_cli.add_report_arguments, _report),
}


def build_parser() -> argparse.ArgumentParser:
    return harness_cli.build_parser(COMMANDS, prog="twinflow-lab", description="Ablation grids, reports and "
                                    "searches for TwinFlow distillation.")


def main(argv: list[str] | None = None) -> int:
    return harness_cli.run_command_line(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
