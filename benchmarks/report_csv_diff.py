"""The numbers a report writes (summary.csv, runs.csv, differences.csv, verdicts.csv), kept and compared.

A change of the report's code that is not meant to change a number is checked by writing the CSVs with the
code before it (``write``) and comparing with the code after it (``check``): byte for byte, file by file.

    python benchmarks/report_csv_diff.py write /tmp/csv-before [--grid runs/tiny ...]
    python benchmarks/report_csv_diff.py check /tmp/csv-before [--grid runs/tiny ...]    # exit 1 on a difference

Always included: the synthetic grid of ``reports.synthetic`` (3 arms x 3 seeds, one diverged run, and claims
given to the report so that verdicts.csv has rows). Each ``--grid`` adds a grid directory, reported as
``build_report`` reports it (its own claims, from the grid manifest).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

CSVS = ("summary.csv", "runs.csv", "differences.csv", "verdicts.csv")


def write_all(out: Path, grids: list[Path]) -> list[Path]:
    """The CSVs of every report into ``out/<name>/``; returns the report directories."""
    from reports.build import build_report, write_report
    from reports.data import prepare
    from reports.synthetic import synthetic_claims, synthetic_grid_frames

    metrics, statuses = synthetic_grid_frames(arms=["vanilla", "renoise", "rl_hard"], seeds=[0, 1, 2], steps=200,
                                              log_every=5, val_every=40, diverge={("rl_hard", 2): 130})
    data = prepare(name="synthetic", metrics=metrics, statuses=statuses)
    dirs = []
    with tempfile.TemporaryDirectory() as tmp:
        write_report(data, out_dir=Path(tmp) / "synthetic", claims=synthetic_claims(), claims_source="a test",
                     progress=False)
        _keep(Path(tmp) / "synthetic", out / "synthetic")
        dirs.append(out / "synthetic")
        for g in grids:
            build_report(grid_dir=g, out_dir=Path(tmp) / g.name, progress=False)
            _keep(Path(tmp) / g.name, out / g.name)
            dirs.append(out / g.name)
    return dirs


def _keep(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in CSVS:
        (dst / name).write_bytes((src / name).read_bytes())


def compare(before: Path, after: Path) -> list[str]:
    """One entry per CSV that differs (with its first differing lines) or is missing on either side."""
    problems = []
    for d in sorted(p for p in before.iterdir() if p.is_dir()):
        for name in CSVS:
            a, b = d / name, after / d.name / name
            if not b.exists():
                problems.append(f"{d.name}/{name}: not written now")
                continue
            ta, tb = a.read_text(), b.read_text()
            if ta != tb:
                diff = list(difflib.unified_diff(ta.splitlines(), tb.splitlines(), "before", "after", lineterm="", n=0))
                problems.append(f"{d.name}/{name} differs:\n" + "\n".join(diff[:12]))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("write", "check"))
    p.add_argument("dir", type=Path, help="where the CSVs are kept (write) or were kept (check)")
    p.add_argument("--grid", type=Path, action="append", default=[], help="a grid directory to report as well")
    a = p.parse_args(argv)
    for g in a.grid:
        if not g.is_dir():
            p.error(f"--grid {g}: no such directory")
    if a.mode == "write":
        for d in write_all(a.dir, a.grid):
            print(f"wrote {d}")
        return 0
    if not a.dir.is_dir():
        p.error(f"{a.dir}: no such directory (run 'write' first, with the code before the change)")
    with tempfile.TemporaryDirectory() as tmp:
        write_all(Path(tmp), a.grid)
        problems = compare(a.dir, Path(tmp))
    for line in problems:
        print(line)
    n = sum(1 for d in a.dir.iterdir() if d.is_dir())
    print(f"{n} report(s), {len(CSVS)} CSVs each: " + ("identical" if not problems else f"{len(problems)} differ"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
