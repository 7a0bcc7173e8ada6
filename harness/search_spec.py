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

Every problem found is reported at once (``SearchSpecError.problems``), each
naming the spec file and the key, like the matrix loader does; nothing is
written while a spec is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from twinflow_train.config import Config, ConfigError, load_config, set_dotted, to_dict

from twinflow_train.yamlio import InputError, float_problem, is_number, read_mapping

from .matrix import RESERVED_KEYS, MatrixError, load_matrix

TOP_KEYS = ("name", "description", "base", "matrix", "arm", "overrides", "seeds", "parameters", "objective",
            "trials", "workers", "sampler", "pruner", "divergence", "storage", "enqueue")
PARAM_KEYS = ("type", "low", "high", "log", "step", "choices")
PARAM_TYPES = ("float", "int", "categorical", "log")
OBJECTIVE_KEYS = ("metric", "direction", "metrics", "directions", "reduce", "constraints", "record")
SAMPLER_KEYS = ("kind", "seed", "n_startup_trials")
PRUNER_KEYS = ("kind", "percentile", "n_startup_trials", "n_warmup_steps", "interval_steps")
DIVERGENCE_KEYS = ("nonfinite", "max_grad_norm", "max_spikes")
DEFAULT_PARAMETERS: dict[str, dict[str, Any]] = {"rl.weight": {"type": "float", "low": 1.0e-3, "high": 1.0,
                                                               "log": True}}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

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


# --------------------------------------------------------------------------- specs


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
    seed: int = 0
    n_startup_trials: int = 10


@dataclass(frozen=True)
class PrunerSpec:
    kind: PrunerKind = "median"
    percentile: float = 25.0
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1

    def build(self) -> Any:
        import optuna

        if self.kind == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                               n_warmup_steps=self.n_warmup_steps, interval_steps=self.interval_steps)
        if self.kind == "percentile":
            return optuna.pruners.PercentilePruner(self.percentile, n_startup_trials=self.n_startup_trials,
                                                   n_warmup_steps=self.n_warmup_steps,
                                                   interval_steps=self.interval_steps)
        if self.kind == "none":
            return optuna.pruners.NopPruner()
        raise ValueError(f"unknown pruner kind {self.kind!r}; valid: median, percentile, none")


@dataclass(frozen=True)
class DivergenceSpec:
    nonfinite: bool = True
    """A non-finite loss, grad norm or objective value (or any skipped non-finite step) marks the trial diverging."""
    max_grad_norm: float | None = None
    """Pre-clip global grad norm above this marks the trial diverging (None: off)."""
    max_spikes: int | None = None
    """More grad-norm spikes than this (the trainer's ``count/spikes``) marks the trial diverging (None: off)."""


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


# --------------------------------------------------------------------------- helpers


def nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(tree, key.split("."), value)
    return tree


def flatten(mapping: Mapping[Any, Any], *, where: str, problems: list[str], prefix: str = "") -> dict[str, Any]:
    """Nested mappings and dotted keys -> one dotted-key dict (a key given twice is a problem)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if not isinstance(k, str) or not k or any(not part for part in k.split(".")):
            problems.append(f"{where}: key {k!r} is not a dotted config key like 'section.field'")
            continue
        key = f"{prefix}.{k}" if prefix else k
        sub = flatten(v, where=where, problems=problems, prefix=key) if isinstance(v, Mapping) and v else {key: v}
        for sk, sv in sub.items():
            if sk in out:
                problems.append(f"{where}: key '{sk}' is given twice")
            out[sk] = sv
    return out


def known_metrics(cfg: Config) -> list[str]:
    """Validation keys a run of ``cfg`` writes (docs/run-directory.md): what an objective may name."""
    out = ["val/loss", "val/best_loss"]
    if cfg.data.dataset == "digits":  # sample metrics need the evaluation network, which only digits has
        for n in cfg.eval.nfe:
            out += [f"val/{what}_nfe{n}" for what in ("fd", "reward", "accuracy", "gold", "proxy")]
    return out


def _number(v: Any) -> bool:
    """A finite number; an integer too large for a float is not one (``float()`` would overflow)."""
    return float_problem(v) is None


def _int(v: Any) -> bool:
    """An integer within the bounds every count and seed of an input file shares (``yamlio.INT_MAX``)."""
    return is_number(v, integer=True)


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


def _strip(message: str, base: Path) -> str:
    prefix = f"{base}: "
    return message[len(prefix):] if message.startswith(prefix) else message


# --------------------------------------------------------------------------- sections


def _parse_param(path: str, body: Any, where: str, problems: list[str]) -> ParamSpec | None:
    if isinstance(body, list):  # shorthand: a list of values is a categorical choice
        body = {"type": "categorical", "choices": body}
    if not isinstance(body, Mapping):
        problems.append(f"{where}: expected a mapping with {', '.join(PARAM_KEYS)} (or a list of choices), "
                        f"got {body!r}")
        return None
    n0 = len(problems)
    for k in body:
        if k not in PARAM_KEYS:
            problems.append(f"{where}: unknown key '{k}'; valid keys: {', '.join(PARAM_KEYS)}")
    kind = body.get("type")
    if kind is None:
        kind = ("categorical" if "choices" in body
                else "int" if _int(body.get("low")) and _int(body.get("high")) and not body.get("log") else "float")
    if kind not in PARAM_TYPES:
        problems.append(f"{where}, key 'type': unknown type {kind!r}; valid: {', '.join(PARAM_TYPES)}")
        return None
    log = body.get("log", kind == "log")
    if kind == "log":
        kind = "float"
        if log is not True:
            problems.append(f"{where}: type 'log' is a log-uniform float; 'log: false' contradicts it")
    if not isinstance(log, bool):
        problems.append(f"{where}, key 'log': expected true/false, got {log!r}")
        log = False
    if kind == "categorical":
        for k in ("low", "high", "log", "step"):
            if k in body:
                problems.append(f"{where}: '{k}' has no meaning for a categorical parameter (give 'choices')")
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}, key 'choices': empty range: expected a non-empty list of values, "
                            f"got {choices!r}")
            return None
        if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
            problems.append(f"{where}, key 'choices': values must be numbers, strings, booleans or null "
                            f"(got {choices!r})")
            return None
        if len({json.dumps(c) for c in choices}) != len(choices):
            problems.append(f"{where}, key 'choices': has duplicates ({choices})")
        return None if len(problems) > n0 else ParamSpec(path=path, kind="categorical", choices=tuple(choices))
    if "choices" in body:
        problems.append(f"{where}: 'choices' belongs to a categorical parameter (type: categorical)")
    low, high, step = body.get("low"), body.get("high"), body.get("step")
    for k, v in (("low", low), ("high", high)):
        if v is None:
            problems.append(f"{where}: '{k}' is missing")
        elif not _number(v) or (kind == "int" and not _int(v)):
            problems.append(f"{where}, key '{k}': expected {'an integer' if kind == 'int' else 'a finite number'}, "
                            f"got {v!r}")
    if step is not None and (not _number(step) or step <= 0 or (kind == "int" and not _int(step))):
        problems.append(f"{where}, key 'step': expected a {'positive integer' if kind == 'int' else 'number > 0'}, "
                        f"got {step!r}")
    if len(problems) > n0:
        return None
    if low >= high:
        problems.append(f"{where}: empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        problems.append(f"{where}: a log range needs low > 0 (got low={low}, high={high})")
    if log and step is not None:
        problems.append(f"{where}: 'step' cannot be combined with 'log: true'")
    if step is not None and low < high and step > high - low:
        problems.append(f"{where}: empty range: step {step} is larger than high - low ({high - low})")
    if len(problems) > n0:
        return None
    return ParamSpec(path=path, kind=kind, low=low, high=high, log=log, step=step)


def _parse_objective(raw: Any, file: str, problems: list[str]) -> ObjectiveSpec | None:
    where = f"{file}: objective"
    if raw is None:
        problems.append(f"{where}: missing; e.g. objective: {{metric: val/fd_nfe2, direction: minimize}}")
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a mapping with {', '.join(OBJECTIVE_KEYS)}, got {raw!r}")
        return None
    n0 = len(problems)
    for k in raw:
        if k not in OBJECTIVE_KEYS:
            problems.append(f"{where}: unknown key '{k}'; valid keys: {', '.join(OBJECTIVE_KEYS)}")
    single, multi = "metric" in raw, "metrics" in raw
    if single == multi:
        problems.append(f"{where}: give either 'metric' + 'direction' (one objective) or 'metrics' + 'directions' "
                        f"(several objectives, a Pareto front)")
        return None
    if single:
        metrics, directions = [raw.get("metric")], [raw.get("direction", "minimize")]
        if "directions" in raw:
            problems.append(f"{where}: 'directions' goes with 'metrics'; use 'direction' with 'metric'")
    else:
        metrics, directions = raw.get("metrics"), raw.get("directions")
        if "direction" in raw:
            problems.append(f"{where}: 'direction' goes with 'metric'; use 'directions' with 'metrics'")
        if not isinstance(metrics, list) or len(metrics) < 2:
            problems.append(f"{where}, key 'metrics': expected a list of at least two metrics, got {metrics!r}")
            return None
        if not isinstance(directions, list) or len(directions) != len(metrics):
            problems.append(f"{where}, key 'directions': expected one direction per metric ({len(metrics)}), "
                            f"got {directions!r}")
            return None
        if len(set(map(str, metrics))) != len(metrics):
            problems.append(f"{where}, key 'metrics': has duplicates ({metrics})")
    for m in metrics:
        if not isinstance(m, str) or not m:
            problems.append(f"{where}: a metric must be a metrics.jsonl key like 'val/fd_nfe2', got {m!r}")
    for d in directions:
        if d not in ("minimize", "maximize"):
            problems.append(f"{where}: unknown direction {d!r}; valid: minimize, maximize")
    reduce = raw.get("reduce", "final")
    if reduce not in ("final", "best"):
        problems.append(f"{where}, key 'reduce': unknown value {reduce!r}; valid: final, best")
    constraints = []
    raw_c = raw.get("constraints") or []
    if not isinstance(raw_c, list):
        problems.append(f"{where}, key 'constraints': expected a list like [{{metric: val/fd_nfe2, max: 30}}], "
                        f"got {raw_c!r}")
        raw_c = []
    for i, c in enumerate(raw_c):
        cw = f"{where}, constraints[{i}]"
        if not isinstance(c, Mapping) or "metric" not in c or len(set(c) & {"max", "min"}) != 1 or len(c) != 2:
            problems.append(f"{cw}: expected {{metric: KEY, max: NUMBER}} or {{metric: KEY, min: NUMBER}}, got {c!r}")
            continue
        side = "max" if "max" in c else "min"
        if not isinstance(c["metric"], str) or not _number(c[side]):
            problems.append(f"{cw}: expected a metric key and a finite number, got {c!r}")
            continue
        constraints.append(ConstraintSpec(metric=c["metric"], bound=float(c[side]), side=side))
    record = raw.get("record") or []
    if not isinstance(record, list) or not all(isinstance(m, str) and m for m in record):
        problems.append(f"{where}, key 'record': expected a list of metrics.jsonl keys like [val/gold_nfe2], "
                        f"got {record!r}")
        record = []
    elif set(record) & set(map(str, metrics)):
        problems.append(f"{where}, key 'record': {sorted(set(record) & set(map(str, metrics)))} is already an "
                        f"objective")
    if len(problems) > n0:
        return None
    return ObjectiveSpec(metrics=tuple(metrics), directions=tuple(directions), reduce=reduce,
                         constraints=tuple(constraints), record=tuple(dict.fromkeys(record)))


def _section(raw: Any, keys: Sequence[str], where: str, problems: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: expected a mapping with {', '.join(keys)}, got {raw!r}")
        return {}
    out = {}
    for k, v in raw.items():
        if k not in keys:
            problems.append(f"{where}: unknown key '{k}'; valid keys: {', '.join(keys)}")
        else:
            out[k] = v
    return out


def _count(raw: dict[str, Any], key: str, default: int, where: str, problems: list[str], *, minimum: int) -> int:
    v = raw.get(key, default)
    if not _int(v) or v < minimum:
        problems.append(f"{where}, key '{key}': expected an integer >= {minimum}, got {v!r}")
        return default
    return v


def _parse_sampler(raw: Any, file: str, problems: list[str]) -> SamplerSpec:
    where = f"{file}: sampler"
    s = _section(raw, SAMPLER_KEYS, where, problems)
    kind = s.get("kind", "tpe")
    if kind not in ("tpe", "random"):
        problems.append(f"{where}, key 'kind': unknown sampler {kind!r}; valid: tpe, random")
        kind = "tpe"
    return SamplerSpec(kind=kind, seed=_count(s, "seed", 0, where, problems, minimum=0),
                       n_startup_trials=_count(s, "n_startup_trials", 10, where, problems, minimum=0))


def _parse_pruner(raw: Any, file: str, problems: list[str], *, multi: bool) -> PrunerSpec:
    where = f"{file}: pruner"
    s = _section(raw, PRUNER_KEYS, where, problems)
    kind = s.get("kind", "none" if multi else "median")
    if kind not in ("median", "percentile", "none"):
        problems.append(f"{where}, key 'kind': unknown pruner {kind!r}; valid: median, percentile, none")
        kind = "none"
    if multi and kind != "none":
        problems.append(f"{where}, key 'kind': Optuna cannot prune on intermediate values of a study with several "
                        f"objectives; use kind: none (diverging trials are still pruned)")
    percentile = s.get("percentile", 25.0)
    if kind == "percentile" and (not _number(percentile) or not 0 < percentile < 100):
        problems.append(f"{where}, key 'percentile': expected a number in (0, 100), got {percentile!r}")
        percentile = 25.0
    elif kind != "percentile" and "percentile" in s:
        problems.append(f"{where}, key 'percentile': only used by kind: percentile")
    return PrunerSpec(kind=kind, percentile=float(percentile),
                      n_startup_trials=_count(s, "n_startup_trials", 5, where, problems, minimum=0),
                      n_warmup_steps=_count(s, "n_warmup_steps", 0, where, problems, minimum=0),
                      interval_steps=_count(s, "interval_steps", 1, where, problems, minimum=1))


def _parse_divergence(raw: Any, file: str, problems: list[str]) -> DivergenceSpec:
    where = f"{file}: divergence"
    s = _section(raw, DIVERGENCE_KEYS, where, problems)
    nonfinite = s.get("nonfinite", True)
    if not isinstance(nonfinite, bool):
        problems.append(f"{where}, key 'nonfinite': expected true/false, got {nonfinite!r}")
        nonfinite = True
    norm = s.get("max_grad_norm")
    if norm is not None and (not _number(norm) or norm <= 0):
        problems.append(f"{where}, key 'max_grad_norm': expected a number > 0 or null, got {norm!r}")
        norm = None
    spikes = s.get("max_spikes")
    if spikes is not None and (not _int(spikes) or spikes < 0):
        problems.append(f"{where}, key 'max_spikes': expected an integer >= 0 or null, got {spikes!r}")
        spikes = None
    return DivergenceSpec(nonfinite=nonfinite, max_grad_norm=None if norm is None else float(norm),
                          max_spikes=spikes)


# --------------------------------------------------------------------------- load


def load_search_spec(path: str | Path) -> SearchSpec:
    """Parse and validate a search spec; raises ``SearchSpecError`` listing every problem. Writes nothing."""
    spec_path = Path(path)
    file = str(spec_path)
    try:
        data = read_mapping(spec_path, kind="search spec", top_keys=TOP_KEYS)
    except InputError as e:
        raise SearchSpecError(e.problems) from None
    problems: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"{file}: unknown top-level key '{key}'; valid keys: {', '.join(TOP_KEYS)}")

    name = data.get("name", spec_path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{file}: name must be a string of letters, digits, '_', '.', '-' (got {name!r}); "
                        f"it names the study and its directory")
    description = data.get("description") or ""

    # base: a trainer config, or one arm of a matrix
    base_path: Path | None = None
    arm_overrides: dict[str, Any] = {}
    source = ""
    if ("base" in data) == ("matrix" in data):
        problems.append(f"{file}: give exactly one of 'base' (a trainer config) or 'matrix' + 'arm' "
                        f"(an arm of an ablation matrix)")
    elif "base" in data:
        if "arm" in data:
            problems.append(f"{file}: 'arm' goes with 'matrix', not with 'base'")
        if not isinstance(data["base"], str):
            problems.append(f"{file}: base must be a path string (got {data['base']!r})")
        else:
            base_path = (spec_path.parent / data["base"]).resolve()
            source = str(base_path)
            if not base_path.is_file():
                problems.append(f"{file}: base config '{data['base']}' does not exist (looked at {base_path})")
                base_path = None
    else:
        arm = data.get("arm")
        if not isinstance(data["matrix"], str) or not isinstance(arm, str):
            problems.append(f"{file}: 'matrix' must be a path and 'arm' the name of one of its arms "
                            f"(got matrix={data['matrix']!r}, arm={arm!r})")
        else:
            matrix_path = (spec_path.parent / data["matrix"]).resolve()
            try:
                grid = load_matrix(matrix_path)
            except MatrixError as e:
                problems.extend(f"{file}: matrix: {p}" for p in e.problems)
            else:
                arms = {a.name: a for a in grid.arms}
                if arm not in arms:
                    problems.append(f"{file}, key 'arm': matrix {matrix_path} has no arm {arm!r}; "
                                    f"arms: {', '.join(arms)}")
                else:
                    base_path, arm_overrides = grid.base_path, dict(arms[arm].overrides)
                    source = f"matrix {matrix_path}, arm {arm}"

    raw_over = data.get("overrides") or {}
    if not isinstance(raw_over, Mapping):
        problems.append(f"{file}: overrides must be a mapping of dotted keys (got {raw_over!r})")
        raw_over = {}
    spec_over = flatten(raw_over, where=f"{file}: overrides", problems=problems)
    for k in spec_over:
        if k in RESERVED_KEYS:
            problems.append(f"{file}: overrides, key '{k}': set by the search for every run "
                            f"(seeds come from 'seeds', telemetry group/name from the study and trial)")
    overrides = {**arm_overrides, **spec_over}

    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(_int(s) and s >= 0 for s in seeds)):
        problems.append(f"{file}: seeds must be a non-empty list of integers >= 0 (got {seeds!r}); "
                        f"the objective is the mean over them")
        seeds = [0]
    elif len(set(seeds)) != len(seeds):
        problems.append(f"{file}: seeds has duplicates ({seeds})")

    raw_params = data.get("parameters", DEFAULT_PARAMETERS)
    params: list[ParamSpec] = []
    if not isinstance(raw_params, Mapping) or not raw_params:
        problems.append(f"{file}: parameters must be a non-empty mapping of dotted config key -> distribution "
                        f"(got {raw_params!r})")
    else:
        for p_path, body in raw_params.items():
            where = f"{file}: parameters, '{p_path}'"
            if not isinstance(p_path, str) or not p_path or any(not part for part in p_path.split(".")):
                problems.append(f"{file}: parameters: {p_path!r} is not a dotted config key like 'rl.weight'")
                continue
            if p_path in RESERVED_KEYS:
                problems.append(f"{where}: set by the search for every run and cannot be searched")
                continue
            if p_path in spec_over:
                problems.append(f"{where}: also set in 'overrides'; a searched key must not be fixed there")
            p = _parse_param(p_path, body, where, problems)
            if p is not None:
                params.append(p)

    objective = _parse_objective(data.get("objective"), file, problems)
    trials = data.get("trials", 20)
    if not _int(trials) or trials < 1:
        problems.append(f"{file}: trials must be an integer >= 1 (got {trials!r})")
        trials = 1
    workers = data.get("workers", 1)
    if not _int(workers) or workers < 1:
        problems.append(f"{file}: workers must be an integer >= 1 (got {workers!r})")
        workers = 1
    sampler = _parse_sampler(data.get("sampler"), file, problems)
    pruner = _parse_pruner(data.get("pruner"), file, problems, multi=bool(objective and objective.multi))
    divergence = _parse_divergence(data.get("divergence"), file, problems)
    storage = data.get("storage")
    if storage is not None:
        problem = storage_problem(storage)
        if problem is not None:
            problems.append(f"{file}, key 'storage': {problem}")
            storage = None

    raw_enqueue = data.get("enqueue") or []
    enqueue: list[dict[str, Any]] = []
    if not isinstance(raw_enqueue, list):
        problems.append(f"{file}: enqueue must be a list of parameter mappings (got {raw_enqueue!r})")
        raw_enqueue = []
    names = {p.path for p in params}
    by_name = {p.path: p for p in params}
    for i, entry in enumerate(raw_enqueue):
        where = f"{file}: enqueue[{i}]"
        if not isinstance(entry, Mapping) or not entry:
            problems.append(f"{where}: expected a mapping of searched parameter -> value, got {entry!r}")
            continue
        flat = flatten(entry, where=where, problems=problems)
        for k, v in flat.items():
            if k not in names:
                problems.append(f"{where}, key '{k}': not a searched parameter ({', '.join(sorted(names)) or 'none'})")
            elif (problem := enqueue_problem(by_name[k], v)) is not None:
                problems.append(f"{where}, key '{k}': {problem}")
        enqueue.append(flat)

    if problems or base_path is None or objective is None:
        raise SearchSpecError(problems or [f"{file}: the base config cannot be resolved"])

    # everything below resolves trainer configs: the trainer's own validation names the key
    try:
        base_cfg = load_config(base_path, nested(overrides))
    except ConfigError as e:
        raise SearchSpecError([f"{file}: base config ({source}) with the overrides: {_strip(p, base_path)}"
                               for p in e.problems]) from None

    for p in params:
        where = f"{file}: parameters, '{p.path}'"
        values = list(p.choices) if p.kind == "categorical" else [p.low, p.high]
        for v in values:
            try:
                load_config(base_path, nested({**overrides, p.path: v}))
            except ConfigError as e:
                problems.extend(f"{where}: value {v!r} does not make a valid trainer config: {_strip(q, base_path)}"
                                for q in e.problems)
                break
    if any(p.path == "rl.weight" for p in params) and not base_cfg.rl.enabled:
        problems.append(f"{file}: parameters, 'rl.weight': the base config has rl.enabled false, so the weight "
                        f"would change nothing; set rl.enabled: true and rl.reward in 'overrides'")
    for i, entry in enumerate(enqueue):
        try:
            load_config(base_path, nested({**overrides, **entry}))
        except ConfigError as e:
            problems.extend(f"{file}: enqueue[{i}]: {_strip(p, base_path)}" for p in e.problems)

    valid = known_metrics(base_cfg)
    for m in list(objective.metrics) + [c.metric for c in objective.constraints] + list(objective.record):
        if m not in valid:
            problems.append(f"{file}: objective: unknown metric '{m}'; the runs write {', '.join(valid)} "
                            f"(eval.nfe = {base_cfg.eval.nfe})")
    if problems:
        raise SearchSpecError(problems)
    return SearchSpec(name=name, path=spec_path, base_path=base_path, source=source, overrides=overrides,
                      seeds=tuple(seeds), parameters=tuple(params), objective=objective, trials=trials,
                      workers=workers, sampler=sampler, pruner=pruner, divergence=divergence, storage=storage,
                      enqueue=tuple(enqueue), description=str(description))
