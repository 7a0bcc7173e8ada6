"""The optional Weights & Biases mirror of metrics.jsonl.

Everything else about the run directory (status, metrics, checkpoints' metadata,
atomic files) is ``twinflow_train.rundir``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping


class WandbMirror:
    """Mirror of the metrics records to Weights & Biases (offline unless told otherwise).

    The run id comes from ``WANDB_RUN_ID`` (the harness derives it from the run identity)
    or the run directory, so a resumed run continues the same W&B run.
    """

    def __init__(self, *, mode: str, project: str, group: str | None, name: str | None, run_dir: Path,
                 config: Mapping[str, Any]):
        try:
            import wandb  # lazy: optional dependency wandb, named when missing
        except ImportError:
            raise RuntimeError("telemetry.wandb is set but the 'wandb' package is not installed "
                               "(pip install 'twinflow-lab[wandb]')") from None
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
