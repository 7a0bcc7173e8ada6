"""Exact forks: how many first steps two runs share, and the request a child run forks with.

Two arms of a ladder often train the very same steps for a while: an RL arm whose weight is
exactly 0 before its switch (``rl.schedule: hard``, or any schedule cut by ``rl.start``) runs the
step of its no-RL parent bit for bit (``trainer.train_step``). ``shared_prefix(parent, child)`` reads
that off the two resolved configs; the child can then start from the parent's state after step k
(``checkpoints/fork-<k>/``, written by ``twinflow-train fit --fork-at k``) instead of training those
steps again (``twinflow-train fit --fork-from PARENT --fork-step k``). docs/run-directory.md, "Forks".

Nothing here imports torch: the harness plans forks with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import rundir
from ..config import Config, ConfigError, config_hash, from_dict, read_yaml, to_dict
from ..rl.schedule import rl_onset

__all__ = ["shared_prefix", "prefix_reason", "ForkRequest", "FORK_BEST", "check_fork_at", "check_fork_request",
           "fork_problem"]

FORK_BEST = "best/weights.pt"
"""Inside ``checkpoints/fork-<k>/``: the best validation weights as of step k (absent before any validation)."""

_IGNORED_SECTIONS = ("telemetry", "checkpoint")
"""Sections that never change a step's numbers: W&B mirroring; checkpoint format, last_good and rotation."""
_RUN_IGNORED = ("ckpt_every", "preempt_grace_s", "preempt_check_every")
"""``run`` fields that change no number: a checkpoint (it settles the gated steps' bookkeeping early and resets
``nonfinite_since_ckpt``, which only decides ``last_good`` copies), and the signal handling (a stop on a
signal writes a checkpoint the run resumes from exactly). ``seed``, ``steps`` and ``val_every`` have their own
rules in ``prefix_reason``. Every other ``run`` field must be equal, new ones included: ``log_every`` (a log
step splits an active RL step's backward, other rounding, and closes the window ``grad_norm/max`` and the
event counts summarise), the non-finite and grad-norm divergence rules (whether a step stops the run), the
time budget, thread count and device (kernels' rounding)."""
_RUN_OWN_RULES = ("seed", "steps", "val_every")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The dotted key of the first value that differs between two ``to_dict`` trees; None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            d = _first_difference(a[k], b.get(k), f"{path}.{k}" if path else k)
            if d is not None:
                return d
        return None
    return None if a == b and type(a) is type(b) else path


def _first_val_step(cfg: Config) -> int:
    return cfg.run.val_every if 0 < cfg.run.val_every <= cfg.run.steps else cfg.run.steps


def prefix_reason(parent: Config, child: Config) -> tuple[int, str]:
    """``(shared_prefix(parent, child), why)``: ``why`` names what bounds it (for messages and plans)."""
    p, c = to_dict(parent), to_dict(child)
    if parent.run.seed != child.run.seed:
        return 0, f"run.seed differs ({parent.run.seed} vs {child.run.seed})"
    for section in p:
        if section in (*_IGNORED_SECTIONS, "run", "rl"):
            continue
        d = _first_difference(p[section], c[section], section)
        if d is not None:
            return 0, f"{d} differs (it acts from step 1, or on the records of steps 0-k)"
    for name in p["run"]:
        if name not in (*_RUN_IGNORED, *_RUN_OWN_RULES) and p["run"][name] != c["run"][name]:
            return 0, f"run.{name} differs"
    if parent.run.max_train_s > 0:
        return 0, "run.max_train_s > 0: where the run stops depends on the clock"
    steps_p, steps_c = parent.run.steps, child.run.steps
    if steps_p == steps_c:
        k, why = steps_p, "the runs are the same run"
    else:
        if parent.schedule.policy == "cosine":
            return 0, "run.steps differs and the cosine learning rate depends on it from step 1"
        # the shorter run validates, logs and splits its RL backward on its last step
        k, why = min(steps_p, steps_c) - 1, f"run.steps differs ({steps_p} vs {steps_c})"
    if parent.run.val_every != child.run.val_every:
        first = min(_first_val_step(parent), _first_val_step(child))
        if first - 1 < k:
            # a validation moves the best-weights counters (and the plateau policy's state)
            k, why = first - 1, f"run.val_every differs: the first validation is at step {first}"
    if p["rl"] != c["rl"]:
        onset = min(rl_onset(parent.rl, steps=k), rl_onset(child.rl, steps=k))
        if onset - 1 < k:
            key = _first_difference(p["rl"], c["rl"], "rl")
            k, why = onset - 1, f"{key} differs and the RL term acts from step {onset}"
    return max(0, k), why


def shared_prefix(parent: Config, child: Config) -> int:
    """The largest step k such that, for the same ``run.seed``, ``child``'s training state after step k is
    bit-identical to ``parent``'s (so ``child`` may start from the parent's state after step k and go on at
    k + 1), and so are the metrics records of steps 0-k except the child's RL telemetry at weight 0.

    Conservative: every field that may act from step 1 and differs gives 0 (model, data, method, renoise,
    optimiser, learning-rate schedule, decay-on-spike, evaluation and sampler settings, parallelism, the
    seed, the log cadence). What may differ and still share steps:

    - ``rl.*``: k = (first step with a non-zero RL weight in either run) - 1; an RL term whose weight is
      exactly 0 leaves the step identical to the no-RL step (``rl.clip``, ``rl.normalize`` ... included);
    - ``run.val_every``: k < the first validation of either run;
    - ``run.steps``: k < the shorter run's length (0 under a cosine learning rate, which reads it);
    - ``telemetry.*``, ``checkpoint.*``, ``run.ckpt_every``, ``run.preempt_*``: ignored.

    Identical configs give ``run.steps``. ``prefix_reason`` says what bounds k.
    """
    return prefix_reason(parent, child)[0]


@dataclass(frozen=True)
class ForkRequest:
    """``twinflow-train fit --fork-from PARENT --fork-step K``: start from ``PARENT/checkpoints/fork-K``."""

    parent: Path
    step: int

    def __post_init__(self) -> None:
        if self.step < 1:
            raise ValueError(f"--fork-step must be >= 1 (got {self.step}); a run from step 0 is not a fork")



def check_fork_at(cfg: Config, steps: Sequence[int]) -> tuple[int, ...]:
    """``--fork-at`` steps, sorted and unique; each must be a step of the run."""
    bad = [k for k in steps if not 1 <= k <= cfg.run.steps]
    if bad:
        raise ConfigError(f"--fork-at: steps must be in [1, run.steps = {cfg.run.steps}] (got {bad})")
    return tuple(sorted(set(steps)))


def _parent_config(parent: Path) -> Config | str:
    """The parent's resolved config, or why it cannot be read."""
    path = parent / rundir.CONFIG_FILE
    if not path.is_file():
        return f"the parent {parent} holds no {rundir.CONFIG_FILE}"
    try:
        return from_dict(Config, read_yaml(path))
    except ConfigError as e:
        return f"{path} does not load ({'; '.join(e.problems)})"


def check_fork_request(cfg: Config, run_dir: Path, fork: ForkRequest) -> None:
    """Refuse (``ConfigError``, before anything is written) a fork the configs do not allow: a run directory
    with no checkpoint of its own whose parent's readable config shares fewer than ``fork.step`` steps with
    ``cfg``. A parent that cannot be read is not refused here: the run falls back to step 0 (``fork_problem``)."""
    if fork.step > cfg.run.steps:
        raise ConfigError(f"--fork-step: {fork.step} is past run.steps ({cfg.run.steps})")
    if any(p.exists() for p in rundir.checkpoint_candidates(run_dir)):
        return  # the run resumes from its own checkpoints; the fork request no longer matters
    parent_cfg = _parent_config(Path(fork.parent))
    if isinstance(parent_cfg, str):
        return
    k, why = prefix_reason(parent_cfg, cfg)
    if k < fork.step:
        raise ConfigError(f"--fork-step {fork.step}: this run shares only its first {k} steps with {fork.parent} "
                          f"({why}); fork at a step <= {k}, or train it from scratch")


def fork_problem(cfg: Config, run_dir: Path, fork: ForkRequest, *, world: int) -> str | None:
    """Why this run cannot start from ``fork.parent``'s ``fork-<step>`` checkpoint; None when it can."""
    parent = Path(fork.parent)
    if not parent.is_dir():
        return f"the parent run directory {parent} does not exist"
    source = rundir.fork_checkpoint(parent, fork.step)
    where = f"{parent.name}/{rundir.CHECKPOINTS_DIR}/{source.name}"
    why = rundir.verify_checkpoint(source)
    if why is None:
        from ..distributed.safeload import data_problem  # lazy: torch; the harness plans forks without it
        why = data_problem(source)  # a parent's checkpoint that is not plain data is never loaded
    if why is not None:
        return f"{where}: {why}"
    meta = rundir.read_json(source / rundir.META_FILE) or {}
    if meta.get("step") != fork.step or meta.get("kind") != "fork":
        return f"{where}: meta.json holds step {meta.get('step')} of kind {meta.get('kind')!r}, not fork step {fork.step}"
    if meta.get("world") != world:
        return f"{where} was written by {meta.get('world')} process(es); this run has {world}"
    parent_cfg = _parent_config(parent)
    if isinstance(parent_cfg, str):
        return parent_cfg
    if meta.get("config_hash") != config_hash(parent_cfg):
        return (f"{where} was written under config {meta.get('config_hash')}, the parent's config.yaml is now "
                f"{config_hash(parent_cfg)}")
    k, why = prefix_reason(parent_cfg, cfg)
    if k < fork.step:
        return f"this run shares only its first {k} steps with the parent ({why})"
    return None
