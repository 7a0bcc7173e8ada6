"""A scripted process for the scheduler's unit tests (``python -m tests.harness.scripted_run fit ...``).

It is not a trainer and no acceptance test uses it: it lets the scheduler's own
logic (slots, exit codes, signals, retries) be tested in milliseconds. What it does
is chosen per run by ``SCRIPT_MODE``:

- ``done``: status running -> done, exit 0;
- ``fail``: status running -> failed with a reason, exit 1;
- ``silent_crash``: exit 1 without touching status.json (a crash before start-up);
- ``sigkill``: status running, then SIGKILL itself (an OOM kill);
- ``contradict``: status done but exit 1;
- ``metrics``: like ``done``, and first writes one train record whose ``grad_norm/max`` is
  ``$SCRIPT_VALUES`` (a JSON list) at the run's seed (the sequential grid's tests).

Every start and end is appended to ``$SCRIPT_TRACE`` so the test can check concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from twinflow_train.rundir import write_status


def _status(run_dir: Path, state: str, reason: str | None = None) -> None:
    write_status(run_dir, state, step=3, reason=reason)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--config", type=Path)
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    mode = os.environ.get("SCRIPT_MODE", "done")
    trace = os.environ.get("SCRIPT_TRACE")

    def mark(event: str) -> None:
        if trace:
            with open(trace, "a") as f:
                f.write(json.dumps({"run": str(args.run_dir), "event": event, "t": time.time(),
                                    "threads": os.environ.get("OMP_NUM_THREADS"),
                                    "wandb": os.environ.get("WANDB_RUN_ID")}) + "\n")

    if args.command == "teacher":
        mark("teacher")
        return 0
    mark("start")
    if mode == "silent_crash":
        print("ImportError: something broke before the run started", file=sys.stderr)
        return 1
    _status(args.run_dir, "running")
    time.sleep(float(os.environ.get("SCRIPT_SLEEP", "0.3")))
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    mark("end")
    if mode == "fail":
        _status(args.run_dir, "failed", "RuntimeError: scripted failure")
        return 1
    if mode == "metrics":
        seed = int(args.run_dir.name.split("-")[1])
        value = json.loads(os.environ["SCRIPT_VALUES"])[seed]
        with open(args.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 10, "kind": "train", "grad_norm/max": value}) + "\n")
    if mode == "contradict":
        _status(args.run_dir, "done")
        return 1
    _status(args.run_dir, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
