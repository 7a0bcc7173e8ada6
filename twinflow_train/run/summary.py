"""What ``twinflow-train fit`` says when it ends: the final validation loss, the student's FD at each NFE beside
the teacher's, and where the samples and metrics are; and whether a run directory is already complete."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import Config, config_hash
from ..rundir import RunDirError, metrics_file, read_metrics, read_status, resume_step, samples_dir


def run_is_complete(cfg: Config, run_dir: str | Path) -> bool:
    """``run_dir`` holds a finished run of this very config: status ``done`` at ``run.steps`` with the same config
    hash, and a checkpoint at that step. Such a run has nothing left to train."""
    run_dir = Path(run_dir)
    try:
        status = read_status(run_dir)
    except RunDirError:
        return False  # an unreadable status is the trainer's to report
    if not status or status.get("state") != "done" or status.get("config_hash") != config_hash(cfg):
        return False
    return int(status.get("step") or 0) >= cfg.run.steps and resume_step(run_dir) >= cfg.run.steps


def _num(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def fit_summary(run_dir: str | Path, *, steps: int, already_complete: bool = False) -> str:
    """A few lines for the end of ``fit`` (read from ``metrics.jsonl``; what was not measured shows as ``-``)."""
    run_dir = Path(run_dir)
    records = read_metrics(metrics_file(run_dir), strict=False).records
    vals = [r for r in records if r.get("kind") == "val"]
    teacher = next((r for r in reversed(records) if r.get("kind") == "teacher"), {})
    head = (f"twinflow-train: {run_dir} was already complete ({steps}/{steps} steps); nothing was trained"
            if already_complete else f"twinflow-train: done, {steps} steps in {run_dir}")
    lines = [head]
    last = vals[-1] if vals else {}
    if "val/loss" in last:
        lines.append(f"  final val loss {_num(last['val/loss'])} (step {last.get('step')})")
    else:
        lines.append("  no validation record (run.val_every never came)")
    nfes = sorted(int(k[len("val/fd_nfe"):]) for k in last if k.startswith("val/fd_nfe"))
    if nfes:
        lines.append(f"  FD at step {last.get('step')}, student beside the teacher (Euler at the same NFE):")
        lines += [f"    NFE {n}: {_num(last[f'val/fd_nfe{n}'])}  teacher {_num(teacher.get(f'teacher/fd_euler{n}'))}"
                  for n in nfes]
    if "teacher/fd" in teacher:
        lines.append(f"  teacher FD {_num(teacher['teacher/fd'])} at {teacher.get('teacher/steps')} steps, "
                     f"CFG {teacher.get('teacher/cfg_scale')}")
    samples = samples_dir(run_dir)
    lines.append(f"  samples: {samples if samples.is_dir() else '(none written)'}")
    lines.append(f"  metrics: {metrics_file(run_dir)}")
    return "\n".join(lines)
