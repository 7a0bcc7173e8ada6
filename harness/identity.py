"""Run identity: a hash of the resolved config (which holds the seed) and the code version.

Two runs with the same identity are the same experiment: the harness never does one
twice. The code version is a hash of the trainer's source files, so editing the
trainer makes every run a new one (the harness then refuses to reuse the old run
directories unless told to set them aside, see ``harness.grid``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from twinflow_train.config import Config, to_dict

IDENTITY_LENGTH = 16


def trainer_package_dir() -> Path:
    spec = importlib.util.find_spec("twinflow_train")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the twinflow_train package cannot be found on sys.path")
    return Path(list(spec.submodule_search_locations)[0])


def code_version(package_dir: Path | None = None) -> str:
    """Hash of every ``.py`` file of the trainer package (path and content), in a fixed order."""
    root = Path(package_dir) if package_dir is not None else trainer_package_dir()
    root = root.resolve()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:IDENTITY_LENGTH]


def run_identity(config: Config | dict[str, Any], code: str) -> str:
    """Identity of one run: sha256 of the resolved config (seed included) and the code version."""
    data = to_dict(config) if isinstance(config, Config) else config
    blob = json.dumps({"config": data, "code_version": code}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:IDENTITY_LENGTH]


def wandb_run_id(identity: str) -> str:
    """W&B run id of a run: fixed by its identity, so a resumed run continues the same W&B run."""
    return f"tfl-{identity}"
