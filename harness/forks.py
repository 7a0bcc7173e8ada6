"""Arms that share a prefix train it once: which arm each arm forks from, and at which step.

``twinflow_train.run.fork.shared_prefix`` says, from two resolved configs, how many first steps two runs of
the same seed share bit for bit. ``plan_forks`` picks for every arm the source that saves the most: the arm,
among those placed before it (ancestors in the ``extends`` tree first, then the matrix order), that shares
the most steps k with it and trains step k itself (its own fork step is below k). A child's seed ``s`` then
starts from ``<source>/seed-<s>/checkpoints/fork-<k>/`` (``fit --fork-from ... --fork-step k``), which the
source's run writes as it passes step k (``fit --fork-at k``); the result is bit-identical to training the
child from scratch (docs/run-directory.md, "Forks"). A source checkpoint that is missing or corrupt makes
the child train from step 0, with the reason recorded in its ``fork.json``.

The scheduler (``harness.grid``) starts a child once its source run has written the checkpoint or ended,
and a sequential wave that runs a child's seed runs its source's seed too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from twinflow_train.rundir import fork_checkpoint
from twinflow_train.run.fork import prefix_reason

from .matrix import ArmSpec, Grid, RunSpec


@dataclass(frozen=True, slots=True)
class Fork:
    source: str
    """The arm whose runs' state after ``step`` this arm starts from."""
    step: int
    why: str
    """What bounds the shared prefix (the first field that acts differently)."""


def _order(arms: Sequence[ArmSpec]) -> list[str]:
    """Arms with every ``extends`` ancestor before its descendants, otherwise in the matrix's order."""
    by_name = {a.name: a for a in arms}
    out: list[str] = []

    def visit(name: str) -> None:
        if name in out:
            return
        parent = by_name[name].extends
        if parent is not None and parent in by_name:
            visit(parent)
        out.append(name)

    for a in arms:
        visit(a.name)
    return out


def _ancestors(arm: str, by_name: Mapping[str, ArmSpec]) -> list[str]:
    out, node = [], by_name[arm].extends
    while node is not None and node in by_name:
        out.append(node)
        node = by_name[node].extends
    return out


def plan_forks(grid: Grid) -> dict[str, Fork]:
    """Arm -> where its runs fork from (arms absent: trained from step 0). Reads configs only."""
    configs = {}
    for spec in grid.runs:  # one config per arm; the seed is set alike on both sides of every comparison
        configs.setdefault(spec.arm, spec.config)
    by_name = {a.name: a for a in grid.arms}
    order = [a for a in _order(grid.arms) if a in configs]
    forks: dict[str, Fork] = {}
    for i, arm in enumerate(order):
        placed = order[:i]
        preference = {a: r for r, a in enumerate(_ancestors(arm, by_name))}  # the nearest ancestor first
        best: tuple[int, int, int, str, str] | None = None
        for j, source in enumerate(placed):
            k, why = prefix_reason(configs[source], configs[arm])
            if k <= 0 or k >= configs[arm].run.steps:
                continue
            if forks.get(source) is not None and forks[source].step >= k:
                continue  # the source did not train step k itself
            key = (k, -preference.get(source, len(preference) + j), -j, source, why)
            if best is None or key[:3] > best[:3]:
                best = key
        if best is not None:
            forks[arm] = Fork(source=best[3], step=best[0], why=best[4])
    return forks


def fork_points(forks: Mapping[str, Fork]) -> dict[str, list[int]]:
    """Source arm -> the steps its runs write fork checkpoints at (for ``fit --fork-at``)."""
    out: dict[str, set[int]] = {}
    for f in forks.values():
        out.setdefault(f.source, set()).add(f.step)
    return {a: sorted(s) for a, s in out.items()}


def source_run(spec: RunSpec, forks: Mapping[str, Fork], runs: Mapping[str, RunSpec],
               no_fork: set[str] = frozenset()) -> RunSpec | None:
    """The run ``spec`` forks from (None: it trains from step 0; ``no_fork`` lists runs told to)."""
    f = forks.get(spec.arm)
    return None if f is None or spec.key in no_fork else runs.get(f"{f.source}/seed-{spec.seed}")


def fork_argv(spec: RunSpec, forks: Mapping[str, Fork], points: Mapping[str, list[int]],
              runs: Mapping[str, RunSpec], no_fork: set[str] = frozenset()) -> list[str]:
    """The trainer flags of ``spec``'s run: the fork checkpoints it writes for its children, and where it forks
    from."""
    argv: list[str] = []
    for k in points.get(spec.arm, []):
        argv += ["--fork-at", str(k)]
    src = source_run(spec, forks, runs, no_fork)
    if src is not None:
        argv += ["--fork-from", str(src.run_dir.resolve()), "--fork-step", str(forks[spec.arm].step)]
    return argv


def ready(spec: RunSpec, forks: Mapping[str, Fork], runs: Mapping[str, RunSpec],
          no_fork: set[str] = frozenset()) -> bool:
    """Has ``spec``'s source written the fork checkpoint (its ``meta.json``, written last)? The trainer verifies
    it before loading it; the scheduler also starts a child whose source run ended without one (the child then
    trains from step 0 and says why)."""
    src = source_run(spec, forks, runs, no_fork)
    if src is None:
        return True
    return (fork_checkpoint(src.run_dir, forks[spec.arm].step) / "meta.json").is_file()


def with_sources(keys: set[str], forks: Mapping[str, Fork], runs: Mapping[str, RunSpec]) -> set[str]:
    """``keys`` (``arm/seed-k``) and, transitively, the runs they fork from."""
    out, todo = set(keys), list(keys)
    while todo:
        spec = runs.get(todo.pop())
        src = None if spec is None else source_run(spec, forks, runs)
        if src is not None and src.key not in out:
            out.add(src.key)
            todo.append(src.key)
    return out


def sources_worth_running(keys: set[str], forks: Mapping[str, Fork], runs: Mapping[str, RunSpec], *,
                          ended: set[str]) -> tuple[set[str], set[str]]:
    """What a wave runs when it needs the runs ``keys``: ``keys`` plus the source runs worth running for their
    forks, and the runs that train from step 0 instead. A source run that the wave does not need and that has
    not run is worth running when its children's shared steps exceed its own length (a sequential wave that
    adds a seed to a child arm alone would otherwise train the whole source run to save part of it)."""
    wanted, no_fork = set(keys), set()
    changed = True
    while changed:
        changed = False
        children: dict[str, list[RunSpec]] = {}
        for key in sorted(wanted):
            spec = runs.get(key)
            src = None if spec is None or key in no_fork else source_run(spec, forks, runs)
            if src is not None and src.key not in wanted and src.key not in ended:
                children.setdefault(src.key, []).append(spec)
        for src_key, kids in children.items():
            shared = sum(forks[k.arm].step for k in kids)
            if shared > runs[src_key].config.run.steps:
                wanted.add(src_key)
            else:
                no_fork.update(k.key for k in kids)
            changed = True
    return wanted, no_fork


def describe(forks: Mapping[str, Fork]) -> list[str]:
    return [f"{arm} forks from {f.source} after step {f.step} ({f.why})" for arm, f in forks.items()]
