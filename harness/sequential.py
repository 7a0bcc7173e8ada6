"""Seeds where they decide something: a grid run in waves, with a look at every claim after each.

A matrix's ``seeds`` may be a plan instead of a list::

    seeds: {first: 3, max: 8, step: 1, spending: pocock}

The seeds are 0 .. max-1. Wave 1 runs the first ``first`` seeds of every arm. After each wave the grid
judges every open test of every claim (``harness.verdicts.sequential_look``: Bonferroni over the matrix's
tests, alpha spent over the looks); a test decided, stopped for futility or at ``max`` is closed and its
verdict never changes. The arms of the tests still open get ``step`` more seeds in the next wave; the
others get none. The grid stops when no test is open.

The looks are recorded in ``<grid>/.harness/sequential.json`` (each wave's seed targets, and every test's
numbers and state at each look). Re-running an interrupted grid replays the recorded looks from the runs'
own files, checks that they decide the same, and goes on from the last one; a grid whose runs no longer
give the recorded decisions is refused, naming the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from twinflow_train.inputs import at_least, checked

from .claims import Claim
from .inference import ALPHA, SPENDINGS, Spending, combine
from .store import HARNESS_DIR, RunDirError, atomic_write_json, read_json
from .verdicts import Judgement, arms_of, next_targets, result_json, sequential_look

RECORD = "sequential.json"
_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class SeedPlan:
    """``seeds: {first, max, step, spending}`` of a matrix (see the module docstring)."""

    first: int = checked(check=at_least(2), missing="the seeds of the first wave (>= 2: one pair gives no interval)")
    """Seeds every arm runs in the first wave."""
    max: int = checked(check=at_least(2), missing="the most seeds an arm may get")
    """The most seeds an arm may get (the seeds are 0 .. max-1)."""
    step: int = checked(1, check=at_least(1))
    """Seeds added per wave to the arms of the tests still open."""
    spending: Spending = "pocock"
    """Alpha-spending function over the looks: ``pocock`` (spends early) or ``obrien-fleming`` (spends late)."""

    def __post_init__(self) -> None:
        if self.first > self.max:
            raise ValueError(f"first ({self.first}) must be at most max ({self.max})")
        if self.spending not in SPENDINGS:
            raise ValueError(f"spending: unknown value {self.spending!r}; valid values: {', '.join(SPENDINGS)}")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.max))

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "max": self.max, "step": self.step, "spending": self.spending}


def record_path(grid_dir: Path) -> Path:
    return Path(grid_dir) / HARNESS_DIR / RECORD


def read_record(grid_dir: Path) -> dict[str, Any] | None:
    """The recorded looks, or None before the first look; ``RunDirError`` when torn."""
    return read_json(record_path(grid_dir))


def initial_targets(arms: Sequence[str], plan: SeedPlan) -> dict[str, int]:
    return {a: plan.first for a in arms}


def write_record(grid_dir: Path, *, plan: SeedPlan, claims: Sequence[Claim], looks: Sequence[dict[str, Any]]) -> None:
    atomic_write_json(record_path(grid_dir), {"version": _VERSION, "plan": plan.to_json(),
                                              "claims": [c.text for c in claims], "alpha": ALPHA,
                                              "looks": list(looks)})


def look_json(wave: int, targets: Mapping[str, int], judgement: Judgement) -> dict[str, Any]:
    return {"wave": wave, "targets": dict(targets), "results": [result_json(r) for r in judgement.results]}


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    def close(x: Any, y: Any) -> bool:
        if isinstance(x, float) or isinstance(y, float):
            x, y = float(x), float(y)
            return (math.isnan(x) and math.isnan(y)) or x == y or abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))
        return x == y
    return all(close(a.get(k), b.get(k)) for k in ("n", "seeds", "looks", "mean", "sd", "verdict", "state"))


def replay(claims: Sequence[Claim], metrics: pd.DataFrame, statuses: pd.DataFrame, *, plan: SeedPlan,
           looks: Sequence[Mapping[str, Any]], check: bool = True) -> tuple[Judgement | None, list[str]]:
    """Recompute the recorded looks from the runs; returns the last judgement and, with ``check``, every test
    whose recomputed numbers differ from the record (the runs changed since the look)."""
    judgement: Judgement | None = None
    problems: list[str] = []
    for look in looks:
        judgement = sequential_look(claims, metrics, statuses, targets=look["targets"], seeds=plan.seeds,
                                    previous=judgement, alpha=ALPHA, spending=plan.spending, n_max=plan.max)
        if check:
            recorded = {(r["claim"], r["part"]): r for r in look["results"]}
            for r in judgement.results:
                old = recorded.get((r.claim, r.part))
                if old is None or not _same(result_json(r), old):
                    problems.append(f"wave {look['wave']}: claim {r.claim + 1} ('{r.text}'), test {r.part + 1}: "
                                    f"recorded {old and (old['verdict'], old['state'], old['n'])}, now "
                                    f"{(r.verdict, r.state, r.n)}")
    return judgement, problems


@dataclass
class Wave:
    """What the next wave runs: seeds per arm, and whether the design is finished."""

    number: int
    targets: dict[str, int]
    done: bool
    judgement: Judgement | None


def resume_state(grid_dir: Path, claims: Sequence[Claim], arms: Sequence[str], plan: SeedPlan,
                 metrics: pd.DataFrame | None, statuses: pd.DataFrame | None) -> Wave:
    """Where an interrupted sequential grid stands: the wave to run next (replayed from the record)."""
    try:
        record = read_record(grid_dir)
    except RunDirError as e:
        raise RunDirError(f"{record_path(grid_dir)}: the sequential record does not load ({e})") from None
    if record is None or not record.get("looks"):
        return Wave(number=1, targets=initial_targets(arms, plan), done=False, judgement=None)
    if record.get("plan") != plan.to_json() or record.get("claims") != [c.text for c in claims]:
        raise RunDirError(f"{record_path(grid_dir)}: recorded for another seed plan or other claims "
                          f"({record.get('plan')}); set the grid aside or restore the matrix")
    looks = record["looks"]
    judgement, problems = replay(claims, metrics, statuses, plan=plan, looks=looks)
    if problems:
        raise RunDirError(f"{record_path(grid_dir)}: the runs no longer give the recorded decisions: "
                          + "; ".join(problems[:3]))
    last = looks[-1]
    targets = next_targets(judgement, {a: int(last["targets"].get(a, plan.first)) for a in arms},
                           step=plan.step, n_max=plan.max)
    done = targets == {a: int(last["targets"].get(a, plan.first)) for a in arms}
    return Wave(number=int(last["wave"]) + 1, targets=targets, done=done, judgement=judgement)


def open_tests_text(judgement: Judgement | None, claims: Sequence[Claim]) -> list[str]:
    """One line per claim for ``grid status``: open (with its n) or its verdict and why it stopped."""
    if judgement is None:
        return [f"claim {i + 1}: open (first wave) — {c.text}" for i, c in enumerate(claims)]
    out = []
    verdicts = judgement.claim_verdicts()
    for ci, c in enumerate(claims):
        parts = [r for r in judgement.results if r.claim == ci]
        n = "/".join(str(r.n) for r in parts)
        if judgement.claim_open(ci):
            arms = sorted({a for r in parts if r.state == "open" for a in arms_of(r.test)})
            out.append(f"claim {ci + 1}: open at n={n} (more seeds for {', '.join(arms)}) — {c.text}")
        else:
            why = "; ".join(sorted({r.stop_text for r in parts}))
            out.append(f"claim {ci + 1}: {verdicts[ci]} at n={n} ({why}) — {c.text}")
    return out


def status_lines(grid_dir: Path, claims: Sequence[Claim], plan: SeedPlan) -> list[str]:
    """``grid status`` of a sequential grid: the wave, and each claim open or decided (from the record)."""
    try:
        record = read_record(grid_dir)
    except RunDirError as e:
        return [f"sequential record: does not load ({e})"]
    head = f"sequential: seeds {plan.first} to {plan.max}, {plan.step} more per wave for open claims"
    if not record or not record.get("looks"):
        return [head + "; wave 1 (no look yet)"]
    last = record["looks"][-1]
    lines = [head + f"; {len(record['looks'])} look(s), the last after wave {last['wave']}"]
    by_claim: dict[int, list[dict[str, Any]]] = {}
    for r in last["results"]:
        by_claim.setdefault(int(r["claim"]), []).append(r)
    for ci, c in enumerate(claims):
        parts = by_claim.get(ci, [])
        n = "/".join(str(r["n"]) for r in parts)
        still = [r for r in parts if r["state"] == "open"] and not any(r["verdict"] == "contradicted" for r in parts)
        if still:
            lines.append(f"  claim {ci + 1}: open at n={n} — {c.text}")
        else:
            lines.append(f"  claim {ci + 1}: {combine([r['verdict'] for r in parts])} at n={n} "
                         f"({', '.join(sorted({r['state'] for r in parts}))}) — {c.text}")
    return lines
