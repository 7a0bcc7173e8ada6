"""The harness's side of a run directory: atomic files, status, the identity record.

The trainer owns ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and
``samples/`` and updates ``status.json`` while it runs. The harness writes:

- ``status.json`` as ``queued`` before it starts a run, and as ``failed`` when the
  trainer process died without saying why (killed by a signal, or exited with an
  error before it could write its own status): otherwise a killed run would read
  ``running`` forever;
- ``harness.json``: the run's identity and the history of its attempts;
- ``launch.yaml``: the resolved config the trainer is started with;
- ``logs/attempt-<n>.log``: stdout and stderr of each attempt.

Every file is replaced atomically (temp file, fsync, rename), so a reader never
sees half of one and a kill never leaves one torn.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

RunState = Literal["queued", "running", "done", "failed", "diverged"]
STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "diverged")
from twinflow_train.telemetry import atomic_write_text  # noqa: E402  (one writer for every run file)
from twinflow_train.telemetry import write_status as _write_status  # noqa: E402

HARNESS_FILE = "harness.json"
LAUNCH_CONFIG = "launch.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_DIR = "logs"


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically, or None when it does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- status.json


def read_status(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / STATUS_FILE)


def write_status(run_dir: Path, state: RunState, *, step: int, reason: str | None = None,
                 config_hash: str | None = None, pid: int | None = None) -> None:
    """Write ``status.json`` with the contract's fields (the trainer's own writer; see docs/run-directory.md)."""
    _write_status(run_dir, state, step=step, reason=reason, config_hash=config_hash, pid=pid)


# --------------------------------------------------------------------------- metrics.jsonl

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf}


def decode_value(value: Any) -> Any:
    """The trainer writes non-finite floats as the strings ``"nan"``/``"inf"``; turn them back into floats."""
    if isinstance(value, str):
        v = _NONFINITE.get(value.lower())
        if v is not None:
            return v
    return value


def parse_metrics_lines(text: str, *, where: str, complete: bool) -> list[dict[str, Any]]:
    """Records of the text of a metrics.jsonl.

    ``complete``: the text runs to the end of the file, so its last line may be a torn
    write, which is skipped (the contract: readers skip a final line that does not parse).
    A line in the middle that does not parse is corruption and raises, naming the line.
    """
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if complete and i == last:
                break
            raise ValueError(f"{where}: line {i + 1} is not valid JSON (only a torn last line is tolerated)") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{where}: line {i + 1} is not a metrics record with a 'step'")
        records.append({k: decode_value(v) for k, v in rec.items()})
    return records


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl (empty when the file does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return parse_metrics_lines(p.read_text(), where=str(p), complete=True)


class MetricsTail:
    """Incremental reader of a growing metrics.jsonl (for the live table).

    Reads only the complete lines appended since the last call; when the file shrinks
    (a resumed run truncates it to its checkpoint) it starts over.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._ino: int | None = None
        self.last: dict[str, Any] = {}
        """Latest value of every key seen (val/ keys from val records, others from train records)."""

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._ino or st.st_size < self._offset:
            # replaced (truncation on resume writes a new file) or shrunk: read it again
            self._offset, self._ino, self.last = 0, st.st_ino, {}
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []  # a line still being written
        self._offset += end + 1
        records = parse_metrics_lines(chunk[: end + 1].decode(), where=str(self.path), complete=False)
        for rec in records:
            self.last.update(rec)
        return records


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


def checkpoint_step(run_dir: Path) -> int:
    """Step of ``checkpoints/latest`` (0 when there is none)."""
    meta = read_json(Path(run_dir) / "checkpoints" / "latest" / "meta.json")
    return int(meta["step"]) if meta and "step" in meta else 0


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
