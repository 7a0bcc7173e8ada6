"""Search spec files: parse and validate everything before a single trial starts.

A spec names a base trainer config (or one arm of an ablation matrix), the
parameters to search with their distributions, the objective, and how many
trials, seeds per trial and workers (the full format is in docs/search.md)::

    name: rl-weight-digits
    base: ../configs/digits.yaml          # or: matrix: blog-digits.yaml + arm: rl_hard
    overrides: {rl.enabled: true, rl.reward: digits}
    seeds: [0]
    parameters:
      rl.weight: {type: float, low: 1.0e-3, high: 1.0, log: true}
    objective: {metric: val/fd_nfe2, direction: minimize, reduce: final}
    trials: 20
    workers: 2

The file's shape is the typed dataclasses below, read by the trainer config's
own loader (``twinflow_train.config.from_dict``) in its every-problem mode; the
loader here only resolves: the base config or matrix arm, dotted keys, the
storage, and every trainer config a parameter's range can reach. Every problem
found is reported at once (``SearchSpecError.problems``), each naming the spec
file and the key; nothing is written while a spec is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping

from twinflow_train.config import Config, load_config, to_dict
from twinflow_train.inputs import ConfigError, SectionProblems, Where, at_least, checked, from_dict, raise_problems
from twinflow_train.rundir import validation_keys
from twinflow_train.yamlio import InputError, float_problem, is_number, read_mapping

from .matrix import (RESERVED_KEYS, MatrixError, flatten, load_matrix, name_problem, nested, seeds_problem,
                     strip_file)


Direction = Literal["minimize", "maximize"]
Reduce = Literal["final", "best"]
ParamKind = Literal["float", "int", "categorical"]
SamplerKind = Literal["tpe", "random"]
PrunerKind = Literal["median", "percentile", "none"]


class SearchSpecError(MatrixError):
    """A search spec that cannot be run; ``problems`` lists every problem found.

    A ``MatrixError`` so that ``twinflow-lab`` reports it the same way (each problem on
    its own line, exit status 2).
    """


def _number(v: Any) -> bool:
    """A finite number; an integer too large for a float is not one (``float()`` would overflow)."""
    return float_problem(v) is None


def _int(v: Any) -> bool:
    """An integer within the bounds every count and seed of an input file shares (``yamlio.INT_MAX``)."""
    return is_number(v, integer=True)


# --------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class ParamSpec:
    path: str
    """Dotted trainer config key, also the Optuna parameter name."""
    kind: ParamKind
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None

    def distribution(self) -> Any:
        # lazy: optuna; the parser imports this module, --help stays free of it
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices or ()))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=None if self.step is None else float(self.step))

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "path"}


@dataclass(frozen=True)
class ConstraintSpec:
    metric: str
    bound: float
    side: Literal["max", "min"]
    """``max``: feasible when metric <= bound; ``min``: feasible when metric >= bound."""

    @property
    def name(self) -> str:
        return f"{self.metric}{'<=' if self.side == 'max' else '>='}{self.bound:g}"

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible, the size of a positive value is how far off it is."""
        return value - self.bound if self.side == "max" else self.bound - value


@dataclass(frozen=True)
class ObjectiveSpec:
    metrics: tuple[str, ...]
    directions: tuple[Direction, ...]
    reduce: Reduce = "final"
    """``final``: the run's last evaluation; ``best``: the evaluation where the first metric is best."""
    constraints: tuple[ConstraintSpec, ...] = ()
    record: tuple[str, ...] = ()
    """Metrics read from the same evaluation and stored with each trial (``recorded``), not optimised: e.g. the
    gold reward beside an objective on its learned proxy."""

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


@dataclass(frozen=True)
class SamplerSpec:
    kind: SamplerKind = "tpe"
    seed: int = checked(0, check=at_least(0))
    n_startup_trials: int = checked(10, check=at_least(0))


@dataclass(frozen=True)
class PrunerSpec:
    kind: PrunerKind | None = None
    """None in the file: ``median`` for one objective, ``none`` for several (resolved by the loader)."""
    percentile: float | None = checked(None, check=lambda v: None if 0 < v < 100 else
                                       f"expected a number in (0, 100), got {v!r}")
    """Kind ``percentile`` only (default 25)."""
    n_startup_trials: int = checked(5, check=at_least(0))
    n_warmup_steps: int = checked(0, check=at_least(0))
    interval_steps: int = checked(1, check=at_least(1))

    def __post_init__(self) -> None:
        if self.percentile is not None and self.kind != "percentile":
            raise SectionProblems([("percentile", "only used by kind: percentile")])

    def build(self) -> Any:
        import optuna  # lazy: optuna; the parser imports this module, --help stays free of it

        if self.kind == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                               n_warmup_steps=self.n_warmup_steps, interval_steps=self.interval_steps)
        if self.kind == "percentile":
            return optuna.pruners.PercentilePruner(25.0 if self.percentile is None else self.percentile,
                                                   n_startup_trials=self.n_startup_trials,
                                                   n_warmup_steps=self.n_warmup_steps,
                                                   interval_steps=self.interval_steps)
        return optuna.pruners.NopPruner()


DIVERGENCE_KEYS = {"max_grad_norm": "run.diverge_grad_norm", "grad_norm_steps": "run.diverge_steps"}
"""The trainer keys the grad-norm part of ``divergence`` sets in every trial's config."""


@dataclass(frozen=True)
class DivergenceSpec:
    nonfinite: bool = True
    """A non-finite loss, grad norm or objective value (or any skipped non-finite step) marks the trial diverging."""
    max_grad_norm: float | None = checked(None, check=lambda v: None if v > 0 else
                                          f"expected a number > 0 or null, got {v!r}")
    """The trainer's divergence rule, one for the search and every run: sets ``run.diverge_grad_norm`` in each
    trial's config (a pre-clip global grad norm above it for ``grad_norm_steps`` consecutive steps ends the run as
    diverged and prunes the trial). None: the base config's own ``run.diverge_grad_norm`` (1000 by default)."""
    grad_norm_steps: int | None = checked(None, check=at_least(1))
    """Sets ``run.diverge_steps`` in each trial's config (None: the base config's own, 10 by default)."""
    max_spikes: int | None = checked(None, check=at_least(0))
    """More grad-norm spikes than this (the trainer's ``count/spikes``) marks the trial diverging (None: off)."""

    def trainer_overrides(self) -> dict[str, Any]:
        """The trainer config keys of the grad-norm rule that this spec sets (dotted keys)."""
        return {key: getattr(self, name) for name, key in DIVERGENCE_KEYS.items() if getattr(self, name) is not None}


@dataclass(frozen=True)
class SearchSpec:
    name: str
    path: Path
    base_path: Path
    source: str
    """Where the base config comes from, for messages: the base file, or ``matrix M, arm A``."""
    overrides: dict[str, Any]
    """Dotted keys applied to the base before the parameters (a matrix arm's overrides, then the spec's)."""
    seeds: tuple[int, ...]
    parameters: tuple[ParamSpec, ...]
    objective: ObjectiveSpec
    trials: int
    workers: int
    sampler: SamplerSpec
    pruner: PrunerSpec
    divergence: DivergenceSpec
    storage: str | None
    enqueue: tuple[dict[str, Any], ...]
    description: str = ""

    def distributions(self) -> dict[str, Any]:
        return {p.path: p.distribution() for p in self.parameters}

    def config(self, params: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None) -> Config:
        """The trainer config of ``params`` (plus ``extra`` dotted keys); raises ``ConfigError``."""
        return load_config(self.base_path, nested({**self.overrides, **dict(params), **dict(extra or {})}))

    def definition(self) -> dict[str, Any]:
        """What makes trials of this study comparable: a changed definition is another study."""
        base = to_dict(self.config({}))
        base["run"]["seed"] = 0
        base["telemetry"]["group"] = None
        base["telemetry"]["name"] = None
        return {"base": base, "seeds": list(self.seeds),
                "parameters": {p.path: p.describe() for p in self.parameters},
                "objective": {"metrics": list(self.objective.metrics), "directions": list(self.objective.directions),
                              "reduce": self.objective.reduce,
                              "constraints": [c.name for c in self.objective.constraints]}}

    def fingerprint(self) -> str:
        blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the file


@dataclass(kw_only=True, slots=True)
class ParamEntry:
    """One ``parameters:`` entry as written; a list of values is shorthand for ``{type: categorical, choices: ...}``."""

    type: Literal["float", "int", "categorical", "log"] | None = None
    """Omitted: ``categorical`` with choices, ``int`` for integer bounds without log, else ``float``."""
    low: int | float | None = None
    high: int | float | None = None
    log: bool | None = None
    """Log-uniform; ``type: log`` is a log-uniform float."""
    step: int | float | None = checked(None, check=lambda v: None if v > 0 else f"expected a number > 0, got {v!r}")
    choices: list[Any] | None = None

    @property
    def kind(self) -> ParamKind:
        if self.type is None:
            return ("categorical" if self.choices is not None
                    else "int" if _int(self.low) and _int(self.high) and not self.log else "float")
        return "float" if self.type == "log" else self.type

    def __post_init__(self) -> None:
        out: list[tuple[str | None, str]] = []
        if self.type == "log" and self.log is False:
            out.append((None, "type 'log' is a log-uniform float; 'log: false' contradicts it"))
        if self.kind == "categorical":
            out += [(None, f"'{k}' has no meaning for a categorical parameter (give 'choices')")
                    for k in ("low", "high", "log", "step") if getattr(self, k) is not None]
            if not self.choices:
                out.append(("choices", f"empty range: expected a non-empty list of values, got {self.choices!r}"))
            elif any(not (c is None or isinstance(c, (bool, int, float, str))) for c in self.choices):
                out.append(("choices", f"values must be numbers, strings, booleans or null (got {self.choices!r})"))
            elif len({json.dumps(c) for c in self.choices}) != len(self.choices):
                out.append(("choices", f"has duplicates ({self.choices})"))
            raise_problems(out)
            return
        if self.choices is not None:
            out.append((None, "'choices' belongs to a categorical parameter (type: categorical)"))
        integer = self.kind == "int"
        for k in ("low", "high"):
            v = getattr(self, k)
            if v is None:
                out.append((None, f"'{k}' is missing"))
            elif integer and not _int(v):
                out.append((k, f"expected an integer, got {v!r}"))
        if integer and self.step is not None and not _int(self.step):
            out.append(("step", f"expected a positive integer, got {self.step!r}"))
        raise_problems(out)
        low, high, step, log = self.low, self.high, self.step, bool(self.log) or self.type == "log"
        if low >= high:
            out.append((None, f"empty range: low ({low}) must be below high ({high})"))
        if log and low <= 0:
            out.append((None, f"a log range needs low > 0 (got low={low}, high={high})"))
        if log and step is not None:
            out.append((None, "'step' cannot be combined with 'log: true'"))
        if step is not None and low < high and step > high - low:
            out.append((None, f"empty range: step {step} is larger than high - low ({high - low})"))
        raise_problems(out)

    def spec(self, path: str) -> ParamSpec:
        if self.kind == "categorical":
            return ParamSpec(path=path, kind="categorical", choices=tuple(self.choices or ()))
        return ParamSpec(path=path, kind=self.kind, low=self.low, high=self.high,
                         log=bool(self.log) or self.type == "log", step=self.step)


@dataclass(kw_only=True, slots=True)
class ConstraintEntry:
    metric: str = checked(missing="a metrics.jsonl key")
    max: float | None = None
    """Feasible when the metric is <= this."""
    min: float | None = None
    """Feasible when the metric is >= this."""

    def __post_init__(self) -> None:
        if (self.max is None) == (self.min is None):
            raise ValueError("expected {metric: KEY, max: NUMBER} or {metric: KEY, min: NUMBER}")

    def spec(self) -> ConstraintSpec:
        side = "max" if self.max is not None else "min"
        return ConstraintSpec(metric=self.metric, bound=float(getattr(self, side)), side=side)


@dataclass(kw_only=True, slots=True)
class ObjectiveEntry:
    metric: str | None = None
    """One objective: a metrics.jsonl key like ``val/fd_nfe2``."""
    direction: Direction | None = None
    """Of ``metric`` (default minimize)."""
    metrics: list[str] | None = None
    """Several objectives (a Pareto front)."""
    directions: list[Direction] | None = None
    """One per entry of ``metrics``."""
    reduce: Reduce = "final"
    constraints: list[ConstraintEntry] = checked(default_factory=list,
                                                 expect="a list like [{metric: val/fd_nfe2, max: 30}]")
    record: list[str] = checked(default_factory=list, expect="a list of metrics.jsonl keys like [val/gold_nfe2]")

    def __post_init__(self) -> None:
        out: list[tuple[str | None, str]] = []
        single, multi = self.metric is not None, self.metrics is not None
        if single == multi:
            raise ValueError("give either 'metric' + 'direction' (one objective) or 'metrics' + 'directions' "
                             "(several objectives, a Pareto front)")
        if single and self.directions is not None:
            out.append((None, "'directions' goes with 'metrics'; use 'direction' with 'metric'"))
        if multi:
            if self.direction is not None:
                out.append((None, "'direction' goes with 'metric'; use 'directions' with 'metrics'"))
            if len(self.metrics) < 2:
                out.append(("metrics", f"expected a list of at least two metrics, got {self.metrics!r}"))
            elif self.directions is None or len(self.directions) != len(self.metrics):
                out.append(("directions", f"expected one direction per metric ({len(self.metrics)}), "
                                          f"got {self.directions!r}"))
            elif len(set(self.metrics)) != len(self.metrics):
                out.append(("metrics", f"has duplicates ({self.metrics})"))
        out += [(None, f"a metric must be a metrics.jsonl key like 'val/fd_nfe2', got {m!r}")
                for m in self.names if not m]
        out += [("record", f"expected metrics.jsonl keys like [val/gold_nfe2], got {self.record!r}")
                for m in self.record if not m][:1]
        if set(self.record) & set(self.names):
            out.append(("record", f"{sorted(set(self.record) & set(self.names))} is already an objective"))
        raise_problems(out)

    @property
    def names(self) -> list[str]:
        return [self.metric] if self.metric is not None else list(self.metrics or ())

    def spec(self) -> ObjectiveSpec:
        directions = [self.direction or "minimize"] if self.metric is not None else list(self.directions or ())
        return ObjectiveSpec(metrics=tuple(self.names), directions=tuple(directions), reduce=self.reduce,
                             constraints=tuple(c.spec() for c in self.constraints),
                             record=tuple(dict.fromkeys(self.record)))


def _name_problem(name: str) -> str | None:
    return name_problem(name, role="the study and its directory")


def _seeds_problem(seeds: list[int]) -> str | None:
    return seeds_problem(seeds, why="; the objective is the mean over them")


@dataclass(kw_only=True, slots=True)
class SpecFile:
    """A search spec file as written (the format is in docs/search.md)."""

    name: str | None = checked(None, check=_name_problem)
    """The study and its directory; default: the file's stem."""
    description: str = ""
    base: str | None = None
    """A trainer config, relative to this file; or ``matrix`` + ``arm``."""
    matrix: str | None = None
    """An ablation matrix, relative to this file, whose ``arm`` is the base."""
    arm: str | None = None
    overrides: dict[str, Any] | None = None
    """Dotted trainer config keys applied to the base before the parameters."""
    seeds: list[int] = checked(default_factory=lambda: [0], check=_seeds_problem,
                               expect="a non-empty list of integers >= 0")
    parameters: dict[str, ParamEntry] = checked(
        default_factory=lambda: {"rl.weight": ParamEntry(type="float", low=1.0e-3, high=1.0, log=True)},
        check=lambda p: None if p else "expected a non-empty mapping of dotted config key -> distribution")
    objective: ObjectiveEntry = checked(missing="e.g. objective: {metric: val/fd_nfe2, direction: minimize}")
    trials: int = checked(20, check=at_least(1))
    workers: int = checked(1, check=at_least(1))
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    divergence: DivergenceSpec = field(default_factory=DivergenceSpec)
    storage: str | None = None
    """A journal file path or an SQLAlchemy URL (``storage_problem``)."""
    enqueue: list[dict[str, Any]] = checked(default_factory=list, expect="a list of parameter mappings")

    def __post_init__(self) -> None:
        out: list[tuple[str | None, str]] = []
        if (self.base is None) == (self.matrix is None):
            out.append((None, "give exactly one of 'base' (a trainer config) or 'matrix' + 'arm' "
                              "(an arm of an ablation matrix)"))
        elif self.base is not None and self.arm is not None:
            out.append((None, "'arm' goes with 'matrix', not with 'base'"))
        elif self.matrix is not None and self.arm is None:
            out.append(("arm", "'matrix' needs the name of one of its arms"))
        if len(self.objective.names) > 1 and self.pruner.kind not in (None, "none"):
            out.append(("pruner", "Optuna cannot prune on intermediate values of a study with several objectives; "
                                  "use kind: none (diverging trials are still pruned)"))
        raise_problems(out)


def _search_keys(raw: Mapping[str, Any], over: Mapping[str, Any], file: str) -> list[str]:
    """The ``parameters`` keys' problems: each must be a dotted config key the search may set."""
    out = []
    for key in raw.get("parameters") or {}:
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            out.append(f"{file}: parameters: {key!r} is not a dotted config key like 'rl.weight'")
        elif key in RESERVED_KEYS:
            out.append(f"{file}: parameters, '{key}': set by the search for every run and cannot be searched")
        elif key in over:
            out.append(f"{file}: parameters, '{key}': also set in 'overrides'; a searched key must not be fixed there")
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as YAML values: ``1`` is not ``true``, ``1.0`` is ``1``."""
    return json.dumps(a) == json.dumps(b) or (_number(a) and _number(b) and a == b)


def enqueue_problem(param: ParamSpec, value: Any) -> str | None:
    """Why ``value`` cannot be enqueued for ``param`` (None: it can): Optuna would sample another value instead."""
    if param.kind == "categorical":
        if not any(_same(value, c) for c in param.choices or ()):
            return f"value {value!r} is not one of the choices {list(param.choices or ())}"
        return None
    integer = param.kind == "int"
    if not (_int(value) if integer else _number(value)):
        return f"expected {'an integer' if integer else 'a finite number'}, got {value!r}"
    if not param.low <= value <= param.high:
        return f"value {value!r} is outside the parameter's range [{param.low}, {param.high}]"
    if param.step is not None:
        k = (value - param.low) / param.step
        if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
            return f"value {value!r} is not on the parameter's grid low + k * step (low={param.low}, step={param.step})"
    return None


def storage_problem(value: Any, *, must_exist: bool = False) -> str | None:
    """Why ``value`` cannot name an Optuna storage (None: it can), decided without opening or creating anything.

    A value without ``://`` is a journal file path; anything else must be a URL whose scheme
    SQLAlchemy knows, with its database driver installed.
    """
    if not isinstance(value, str) or not value.strip():
        return f"expected a journal file path or an SQLAlchemy URL, got {value!r}"
    if "\0" in value:
        return "contains a NUL character"
    if "://" not in value:
        path = Path(value)
        if path.is_dir():
            return f"{value} is a directory; a journal storage is a file"
        if must_exist and not path.is_file():
            return f"journal file {value} does not exist"
        for parent in path.parents:
            if parent.exists():
                return None if parent.is_dir() else f"{parent} is not a directory"
        return None
    # lazy: sqlalchemy (optuna's), only for a database URL
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = value.split("://", 1)[0]
    try:
        url = make_url(value)
        dialect = url.get_dialect()
    except NoSuchModuleError:
        return (f"unknown URL scheme '{scheme}'; give a journal file path, sqlite:///PATH or a database URL "
                f"SQLAlchemy knows (postgresql://, mysql://, ...)")
    except (ArgumentError, ValueError, TypeError) as e:
        return f"not a valid SQLAlchemy URL ({e})"
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return "an in-memory SQLite database is gone when the process ends; give a file: sqlite:///PATH"
        if must_exist and not Path(url.database).is_file():
            return f"SQLite database {url.database} does not exist"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return f"the database driver of '{url.drivername}' is not installed ({e})"
    return None


# --------------------------------------------------------------------------- load


def _read(spec_path: Path) -> tuple[SpecFile | None, dict[str, Any], list[str]]:
    """The typed file, its flattened overrides, and every problem of its shape."""
    file = str(spec_path)
    try:
        data = read_mapping(spec_path, kind="search spec", top_keys=[f.name for f in fields(SpecFile)])
    except InputError as e:
        raise SearchSpecError(e.problems) from None
    params = data.get("parameters")
    if isinstance(params, Mapping):  # the shorthand: a list of values is a categorical choice
        data["parameters"] = {k: {"type": "categorical", "choices": v} if isinstance(v, list) else v
                              for k, v in params.items()}
    problems: list[str] = []
    try:
        spec_file = from_dict(SpecFile, data, Where(file=file))
    except ConfigError as e:
        problems.extend(e.problems)
        spec_file = None
    raw_over = data.get("overrides") or {}
    over = flatten(raw_over, where=f"{file}: overrides", problems=problems) if isinstance(raw_over, Mapping) else {}
    problems += [f"{file}: overrides, key '{k}': set by the search for every run "
                 f"(seeds come from 'seeds', telemetry group/name from the study and trial)"
                 for k in over if k in RESERVED_KEYS]
    problems += _search_keys(data, over, file)
    return spec_file, over, problems


def _base(f: SpecFile, spec_path: Path, problems: list[str]) -> tuple[Path | None, dict[str, Any], str]:
    """The base config file, a matrix arm's overrides, and how messages name the source."""
    file = str(spec_path)
    if f.base is not None:
        base_path = (spec_path.parent / f.base).resolve()
        if not base_path.is_file():
            problems.append(f"{file}: base config '{f.base}' does not exist (looked at {base_path})")
            return None, {}, ""
        return base_path, {}, str(base_path)
    matrix_path = (spec_path.parent / str(f.matrix)).resolve()
    try:
        grid = load_matrix(matrix_path)
    except MatrixError as e:
        problems.extend(f"{file}: matrix: {p}" for p in e.problems)
        return None, {}, ""
    arms = {a.name: a for a in grid.arms}
    if f.arm not in arms:
        problems.append(f"{file}, key 'arm': matrix {matrix_path} has no arm {f.arm!r}; arms: {', '.join(arms)}")
        return None, {}, ""
    return grid.base_path, dict(arms[f.arm].overrides), f"matrix {matrix_path}, arm {f.arm}"


def load_search_spec(path: str | Path) -> SearchSpec:
    """Parse and validate a search spec; raises ``SearchSpecError`` listing every problem. Writes nothing."""
    spec_path = Path(path)
    file = str(spec_path)
    f, spec_over, problems = _read(spec_path)
    if f is None or problems:
        raise SearchSpecError(problems)
    base_path, arm_over, source = _base(f, spec_path, problems)
    if f.storage is not None and (problem := storage_problem(f.storage)) is not None:
        problems.append(f"{file}, key 'storage': {problem}")
    params = [entry.spec(key) for key, entry in f.parameters.items()]
    by_name = {p.path: p for p in params}
    enqueue: list[dict[str, Any]] = []
    for i, entry in enumerate(f.enqueue):
        where = f"{file}: enqueue[{i}]"
        flat = flatten(entry, where=where, problems=problems)
        if not flat:
            problems.append(f"{where}: expected a mapping of searched parameter -> value, got {entry!r}")
        for k, v in flat.items():
            if k not in by_name:
                problems.append(f"{where}, key '{k}': not a searched parameter ({', '.join(sorted(by_name))})")
            elif (problem := enqueue_problem(by_name[k], v)) is not None:
                problems.append(f"{where}, key '{k}': {problem}")
        enqueue.append(flat)
    if problems or base_path is None:
        raise SearchSpecError(problems or [f"{file}: the base config cannot be resolved"])

    # everything below resolves trainer configs: the trainer's own validation names the key
    rule = f.divergence.trainer_overrides()
    for name, key in DIVERGENCE_KEYS.items():
        if key in rule and (key in spec_over or key in by_name):
            problems.append(f"{file}: divergence.{name} sets the trainer's {key}, which "
                            f"{'overrides' if key in spec_over else 'parameters'} also set; give it in one place")
    overrides = {**arm_over, **spec_over, **rule}
    try:
        base_cfg = load_config(base_path, nested(overrides))
    except ConfigError as e:
        raise SearchSpecError([f"{file}: base config ({source}) with the overrides: {strip_file(p, base_path)}"
                               for p in e.problems]) from None
    for p in params:
        for v in list(p.choices) if p.kind == "categorical" else [p.low, p.high]:
            try:
                load_config(base_path, nested({**overrides, p.path: v}))
            except ConfigError as e:
                problems.extend(f"{file}: parameters, '{p.path}': value {v!r} does not make a valid trainer config: "
                                f"{strip_file(q, base_path)}" for q in e.problems)
                break
    if "rl.weight" in by_name and not base_cfg.rl.enabled:
        problems.append(f"{file}: parameters, 'rl.weight': the base config has rl.enabled false, so the weight "
                        f"would change nothing; set rl.enabled: true and rl.reward in 'overrides'")
    for i, entry in enumerate(enqueue):
        try:
            load_config(base_path, nested({**overrides, **entry}))
        except ConfigError as e:
            problems.extend(f"{file}: enqueue[{i}]: {strip_file(p, base_path)}" for p in e.problems)
    objective = f.objective.spec()
    valid = validation_keys(base_cfg)
    for m in list(objective.metrics) + [c.metric for c in objective.constraints] + list(objective.record):
        if m not in valid:
            problems.append(f"{file}: objective: unknown metric '{m}'; the runs write {', '.join(valid)} "
                            f"(eval.nfe = {base_cfg.eval.nfe})")
    if problems:
        raise SearchSpecError(problems)
    pruner = f.pruner if f.pruner.kind is not None else replace(f.pruner, kind="none" if objective.multi else "median")
    return SearchSpec(name=f.name or spec_path.stem, path=spec_path, base_path=base_path, source=source,
                      overrides=overrides, seeds=tuple(f.seeds), parameters=tuple(params), objective=objective,
                      trials=f.trials, workers=f.workers, sampler=f.sampler, pruner=pruner, divergence=f.divergence,
                      storage=f.storage, enqueue=tuple(enqueue), description=f.description)
