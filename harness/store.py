"""The harness's side of a run directory: atomic files, status, the identity record.

The trainer owns ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and
``samples/`` and updates ``status.json`` while it runs. The harness writes:

- ``status.json`` as ``queued`` before it starts a run, and as ``failed`` when the
  trainer process died without saying why (killed by a signal, or exited with an
  error before it could write its own status): otherwise a killed run would read
  ``running`` forever;
- ``harness.json``: the run's identity and the history of its attempts;
- ``launch.yaml``: the resolved config the trainer is started with;
- ``logs/attempt-<n>.log``: stdout and stderr of each attempt;

and, once per grid, ``<grid>/.harness/grid.json`` (the grid manifest): what made the grid
(a matrix or a search spec), its arms in the file's order and its claims, so that readers
of the directory (``harness.collect``, the reports) never load the matrix file.

Every file is replaced atomically (temp file, fsync, rename), so a reader never
sees half of one and a kill never leaves one torn.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

# the run-directory protocol is the trainer package's; the harness uses it, never re-implements it
from twinflow_train.rundir import (METRICS_FILE, STATES, STATUS_FILE, MetricsRead, MetricsTail,  # noqa: F401
                                   RunDirError, atomic_write_json, atomic_write_text, decode_value,
                                   parse_metrics_lines, read_json, read_status, resume_step, write_status)
from twinflow_train.rundir import read_metrics as _read_metrics

RunState = Literal["queued", "running", "done", "failed", "diverged", "preempted"]

HARNESS_DIR = ".harness"
"""The harness's own folder of a grid (lock, manifest, shared-asset logs, metrics cache)."""
GRID_MANIFEST = "grid.json"
HARNESS_FILE = "harness.json"
LAUNCH_CONFIG = "launch.yaml"
LOG_DIR = "logs"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, strictly (empty when the file does not exist)."""
    return _read_metrics(path).records


# --------------------------------------------------------------------------- harness.json


@dataclass
class Attempt:
    number: int
    launcher: str
    started: float
    ended: float | None = None
    exit_code: int | None = None
    outcome: str | None = None
    """done | failed | diverged | interrupted (the harness stopped or was killed before the run ended)."""
    reason: str | None = None
    log: str | None = None
    """Path of the attempt's log, relative to the run directory."""
    start_step: int = 0
    """Checkpointed step the attempt started from (0: from scratch)."""


@dataclass
class RunRecord:
    """Contents of ``harness.json``: who this run is, and what happened to it."""

    identity: str
    config_hash: str
    code_version: str
    grid: str
    arm: str
    seed: int
    matrix: str
    overrides: dict[str, Any]
    created: float = field(default_factory=time.time)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "failed")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunRecord":
        data = dict(data)
        data["attempts"] = [Attempt(**a) for a in data.get("attempts", [])]
        return cls(**data)


def read_record(run_dir: Path) -> RunRecord | None:
    data = read_json(Path(run_dir) / HARNESS_FILE)
    return None if data is None else RunRecord.from_json(data)


def write_record(run_dir: Path, record: RunRecord) -> None:
    atomic_write_json(Path(run_dir) / HARNESS_FILE, record.to_json())


def iter_run_dirs(grid_dir: Path) -> Iterator[tuple[str, int, Path]]:
    """(arm, seed, run_dir) of every run directory of a grid, in a stable order.

    Hidden folders (``.harness``, ``.superseded``) are the harness's own and are skipped.
    """
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        return
    for arm_dir in sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        seeds = []
        for run_dir in arm_dir.iterdir():
            if not run_dir.is_dir() or not run_dir.name.startswith("seed-"):
                continue
            try:
                seeds.append((int(run_dir.name[len("seed-"):]), run_dir))
            except ValueError:
                continue
        for seed, run_dir in sorted(seeds):
            yield arm_dir.name, seed, run_dir


# --------------------------------------------------------------------------- grid manifest


def write_grid_manifest(grid_dir: Path, *, kind: Literal["grid", "search"], source: Path,
                        arms: list[str] | None, claims: list[dict[str, Any]],
                        parents: dict[str, str | None] | None = None) -> None:
    """``<grid>/.harness/grid.json``: ``kind``, the ``source`` file, ``arms`` in its order (None: a search, whose
    trial groups are made as it runs), ``parents`` (arm -> the arm it ``extends``, None for a root arm) and the
    claims (``harness.claims.Claim.to_json``)."""
    atomic_write_json(Path(grid_dir) / HARNESS_DIR / GRID_MANIFEST,
                      {"kind": kind, "source": str(Path(source).resolve()), "arms": arms, "parents": parents,
                       "claims": claims, "written": time.time()})


def read_grid_manifest(grid_dir: Path) -> dict[str, Any] | None:
    """The grid manifest, or None for a grid run before the harness wrote one; raises ``RunDirError`` when torn."""
    return read_json(Path(grid_dir) / HARNESS_DIR / GRID_MANIFEST)
