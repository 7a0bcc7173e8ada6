"""The teacher's metrics, computed once per (teacher, evaluation settings, code) and reused by every run.

The step-0 ``kind: teacher`` record (``Evaluator.teacher_metrics``: the teacher at its full step count
plus its own 1-, 2- and 4-step Euler FD, 35 forwards over ``eval.n_samples`` rows) depends only on
what the key below holds, not on the run's seed or its training settings: the teacher samples at
tt = t, where the target-time embedding's gate (t - tt) is exactly zero, so the per-run
initialisation of that embedding (``model.tt_init``, ``run.seed``) cannot reach the numbers. The
values live in the asset cache as one JSON file per key (``<cache root>/teachermetrics-<hash>/
metrics.json``), written by ``assets.auxiliary.train_or_load_file``: atomically, under the entry's
lock (a second run asking while the first computes waits for it), with a checksum record that is
verified before the file is read. JSON keeps every float exactly (``repr`` round-trips), so a run
that reads the entry logs the same bytes as one that computed it.

The key holds everything the numbers depend on: the teacher's weights and the codec, reward,
evaluation and proxy networks (the sha256 of each file), the model architecture, the teacher's
sampling settings, the evaluation seed and sample count, the data split, the parallel settings,
world size, device, torch version and thread count (reductions can round differently), and a hash
of the trainer's source files (any code change makes a new entry).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..assets.auxiliary import (WEIGHTS, CacheCorruptError, cache_entry, codec_key, entry_record, eval_key, is_complete,
                               proxy_key, reward_key, train_or_load_file)
from ..config import Config, to_dict
from ..rundir import file_digest

METRICS_FILE = "metrics.json"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 of every ``.py`` file of the ``twinflow_train`` package (path and content), in a fixed order."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _weights_digest(path: Path, *, cached: bool) -> str:
    """sha256 of a weights file: from its verified cache record, or read from the file itself."""
    return entry_record(path)["sha256"] if cached else file_digest(path)


def scorer_digests(cfg: Config) -> dict[str, str]:
    """sha256 of each cached network the digits scorer and decoder use (codec, reward, evaluation net, proxy)."""
    kinds = [("reward", reward_key), ("evalnet", eval_key), ("proxy", proxy_key)]
    if cfg.codec.kind == "autoencoder":
        kinds.append(("codec", codec_key))
    elif cfg.codec.kind != "identity":
        raise ValueError(f"codec.kind {cfg.codec.kind!r}: the teacher-metrics cache covers the digits codecs only")
    return {kind: _weights_digest(cache_entry(cfg, kind=kind, key=key(cfg)) / WEIGHTS, cached=True)  # type: ignore[arg-type]
            for kind, key in kinds}


def teacher_metrics_key(cfg: Config, *, teacher_weights: Path, world: int, fsdp: bool,
                        device: torch.device) -> dict[str, Any]:
    """Everything ``Evaluator.teacher_metrics`` reads, as a JSON-able mapping (the cache entry's key)."""
    model = to_dict(cfg.model)
    model.pop("tt_init")  # E2's initialisation: gated out at tt = t (see the module docstring)
    return {
        "teacher_weights": _weights_digest(teacher_weights, cached=cfg.teacher.checkpoint == "auto"),
        "scorer": scorer_digests(cfg),
        "model": model,
        "teacher": {"sample_steps": cfg.teacher.sample_steps, "cfg_scale": cfg.teacher_cfg_scale},
        "eval": {"seed": cfg.eval.seed, "n_samples": cfg.eval.n_samples, "reference": cfg.eval.reference},
        "data": {"dataset": cfg.data.dataset, "val_fraction": cfg.data.val_fraction,
                 "split_seed": cfg.data.split_seed},
        "parallel": to_dict(cfg.parallel) | {"world": world, "fsdp": fsdp},
        "runtime": {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "code": source_hash(),
    }


def teacher_metrics_path(cfg: Config, key: dict[str, Any]) -> Path:

    return cache_entry(cfg, kind="teachermetrics", key=key) / METRICS_FILE


def read_metrics(path: Path) -> dict[str, float]:
    values = json.loads(path.read_text())
    if not isinstance(values, dict) or not values:
        raise ValueError(f"{path}: expected a non-empty JSON object of teacher metrics")
    return values


def cached_teacher_metrics(cfg: Config, compute: Callable[[], dict[str, float]], *, teacher_weights: Path | None,
                           world: int, rank: int, fsdp: bool, device: torch.device) -> dict[str, float]:
    """``compute()``'s values from the cache, computed and stored once per key.

    One process: under the entry's lock (another run computing the same key is waited for). Several
    ranks: the forwards may be collective, so rank 0 looks the entry up and tells the others; on a miss
    every rank computes and rank 0 stores the values; on a hit only rank 0 (which writes the record)
    holds them and the other ranks return an empty mapping.
    """
    if teacher_weights is None:
        return compute()  # base weights read from a model directory: no file to key the values by
    key = teacher_metrics_key(cfg, teacher_weights=teacher_weights, world=world, fsdp=fsdp, device=device)
    path = teacher_metrics_path(cfg, key)

    def store(values: dict[str, float]) -> Callable[[Path], dict[str, Any]]:
        def make(tmp: Path) -> dict[str, Any]:
            tmp.write_text(json.dumps(values, sort_keys=True) + "\n")
            return {"metrics": len(values)}
        return make

    if world == 1:
        computed: dict[str, float] = {}

        def make(tmp: Path) -> dict[str, Any]:
            computed.update(compute())
            return store(computed)(tmp)

        train_or_load_file(path, make, key=key)
        return computed if computed else read_metrics(path)
    hit = torch.zeros(1, device=device)
    if rank == 0:
        try:
            hit.fill_(float(is_complete(path)))
        except CacheCorruptError:
            pass  # rebuilt below (train_or_load_file sets the corrupt payload aside)
    torch.distributed.broadcast(hit, src=0)
    if hit.item():
        return read_metrics(path) if rank == 0 else {}
    values = compute()
    if rank == 0:
        train_or_load_file(path, store(values), key=key)
    return values
