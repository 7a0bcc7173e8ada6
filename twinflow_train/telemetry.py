"""Run-directory I/O: status.json, metrics.jsonl, the optional W&B mirror.

metrics.jsonl is append-only; each record is one ``write`` of one line, so a
crash can tear at most the last line, which readers skip and a resume drops.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

STATES = ("queued", "running", "done", "failed", "diverged")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename is durable only once the directory entry is on disk


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_status(run_dir: Path, state: str, *, step: int, reason: str | None = None,
                 config_hash: str | None = None, pid: int | None = None) -> None:
    """``status.json`` per the run-directory contract; ``pid`` defaults to this process."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; valid: {', '.join(STATES)}")
    payload = {"state": state, "reason": reason, "step": int(step), "updated": time.time(),
               "pid": os.getpid() if pid is None else pid, "config_hash": config_hash}
    atomic_write_text(Path(run_dir) / "status.json", json.dumps(payload, indent=1) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "status.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep them visible as strings rather than dropping or zeroing them
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a metrics.jsonl; a final line that does not parse (torn write) is skipped."""
    p = Path(path)
    if not p.is_file():
        return
    lines = p.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return
            raise ValueError(f"{p}: line {i + 1} is not valid JSON (only a torn last line is tolerated)") from None


class MetricsWriter:
    def __init__(self, path: Path, *, mirror: "WandbMirror | None" = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self.mirror = mirror

    def write(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step'")
        line = json.dumps({k: _clean(v) for k, v in record.items()}, separators=(",", ":")) + "\n"
        self._f.write(line)
        self._f.flush()
        if self.mirror is not None:
            self.mirror.log(record)

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()
        if self.mirror is not None:
            self.mirror.finish()


def truncate_metrics(path: Path, *, last_step: int) -> int:
    """Keep records with step <= last_step (a resume point); drop a torn tail. Returns records kept."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept = [r for r in iter_metrics(p) if int(r["step"]) <= last_step]
    atomic_write_text(p, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept))
    return len(kept)


class WandbMirror:
    """Mirror of the metrics records to Weights & Biases (offline unless told otherwise).

    The run id comes from ``WANDB_RUN_ID`` (the harness derives it from the run identity)
    or the run directory, so a resumed run continues the same W&B run.
    """

    def __init__(self, *, mode: str, project: str, group: str | None, name: str | None, run_dir: Path,
                 config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("telemetry.wandb is set but the 'wandb' package is not installed "
                               "(pip install 'twinflow-lab[wandb]')") from None
        import hashlib
        mode = os.environ.get("WANDB_MODE", mode)
        run_id = os.environ.get("WANDB_RUN_ID") or hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self._wandb = wandb
        self._run = wandb.init(project=project, group=group, name=name, id=run_id, resume="allow", mode=mode,
                               dir=str(run_dir), config=dict(config))

    def log(self, record: Mapping[str, Any]) -> None:
        data = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self._run.log(data, step=int(record["step"]))

    def finish(self) -> None:
        self._run.finish()
