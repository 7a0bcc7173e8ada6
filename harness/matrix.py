"""Ablation matrix files: parse, resolve every arm to a trainer config, validate.

A matrix file (see docs/harness.md for the full format)::

    name: blog-digits                  # grid name: runs/<name>/ (default: the file's stem)
    base: ../configs/digits.yaml       # trainer config, relative to this file
    seeds: [0, 1, 2]
    vars: {steps: 600}                 # optional; "${expr}" in any override value is evaluated
    overrides: {run.steps: "${steps}"} # optional; applied to every arm first
    axes: {optim.lr: [1.0e-4, 3.0e-4]} # optional cartesian axes over every arm
    arms:                              # arm = base + overrides + its own dotted keys
      vanilla: {}
      renoise: {extends: vanilla, renoise.schedule: blog_linear}
    claims: [...]                      # optional: which arm pair tests which claim (harness/claims.py)

The file's shape is ``MatrixFile``, read by the trainer config's own loader
(``twinflow_train.config.from_dict``) in its every-problem mode; this module then
expands ``extends`` and ``${expr}`` values and resolves every arm with
``twinflow_train.config.load_config`` (the trainer's own resolution, cross-field
rules included) before any file is written. Every problem found is reported at
once, each naming the matrix file, the arm and the key.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import operator
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from twinflow_train.config import Config, config_hash, load_config, to_dict
from twinflow_train.inputs import ConfigError, Where, checked, from_dict, raise_problems, set_dotted
from twinflow_train.yamlio import InputError, read_mapping

from .claims import Claim, parse_claims
from .identity import code_version as trainer_code_version
from .identity import run_identity
from .sequential import SeedPlan

ARM_EXTENDS = "extends"
# set by the harness for every run; an arm setting them would be silently overridden
RESERVED_KEYS = ("run.seed", "telemetry.group", "telemetry.name")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPR_RE = re.compile(r"\$\{([^}]*)\}")


class MatrixError(InputError):
    """A matrix file that cannot be run; ``problems`` lists every problem found."""


# --------------------------------------------------------------------------- YAML


def read_matrix_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a matrix file, read like every input file (``twinflow_train.yamlio.read_mapping``)."""
    try:
        return read_mapping(path, kind="matrix", top_keys=[f.name for f in fields(MatrixFile)], named={"arms": "arm name"})
    except InputError as e:
        raise MatrixError(e.problems) from None


# --------------------------------------------------------------------------- ${expr} values

# an expression computes a config value: anything beyond this many bits or characters is a mistake, and
# stopping before computing it keeps ``${9**9**9}`` from running for hours
_MAX_BITS = 4096
_MAX_CHARS = 10_000


def _bounded_pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * (abs(a).bit_length() - 1) > _MAX_BITS:
        raise ValueError(f"{a} ** {b} is too large")
    return operator.pow(a, b)


def _bounded_mul(a: Any, b: Any) -> Any:
    n = b if isinstance(a, str) else a if isinstance(b, str) else None
    text = a if isinstance(a, str) else b
    if isinstance(n, int) and n * len(text) > _MAX_CHARS:
        raise ValueError(f"a string repeated {n} times is too long")
    return operator.mul(a, b)


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _bounded_mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _bounded_pow,
}
_FUNCS: dict[str, Callable[..., Any]] = {"int": int, "float": float, "round": round, "min": min, "max": max}


def _eval_node(node: ast.AST, env: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body, env)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise ValueError(f"unknown variable '{node.id}' (vars: {', '.join(env) or 'none'})")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        out = _BINOPS[type(node.op)](_eval_node(node.left, env), _eval_node(node.right, env))
        if isinstance(out, int) and out.bit_length() > _MAX_BITS:
            raise ValueError(f"an intermediate value has more than {_MAX_BITS} bits")
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else +v
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords):
        return _FUNCS[node.func.id](*(_eval_node(a, env) for a in node.args))
    raise ValueError(f"unsupported expression element {ast.dump(node)[:60]} "
                     f"(allowed: numbers, vars, + - * / // % **, {', '.join(_FUNCS)})")


def evaluate(value: Any, env: Mapping[str, Any]) -> Any:
    """Replace ``${expr}`` in strings (recursively in lists); a value that is one whole ``${expr}`` keeps its type."""
    if isinstance(value, list):
        return [evaluate(v, env) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def one(expr: str) -> Any:
        try:
            out = _eval_node(ast.parse(expr.strip(), mode="eval"), env)
        except SyntaxError:
            raise ValueError(f"'${{{expr}}}' is not a valid expression") from None
        except ZeroDivisionError:
            raise ValueError(f"'${{{expr}}}' divides by zero") from None
        except OverflowError as e:
            raise ValueError(f"'${{{expr}}}' overflows ({e})") from None
        except RecursionError:
            raise ValueError(f"'${{{expr}}}' is nested too deeply") from None
        return out

    whole = _EXPR_RE.fullmatch(value)
    if whole:
        return one(whole.group(1))
    return _EXPR_RE.sub(lambda m: str(one(m.group(1))), value)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ArmSpec:
    name: str
    overrides: dict[str, Any]
    """Dotted key -> value: the top-level overrides, the ``extends`` chain, the arm's own keys, its axis values."""
    extends: str | None = None
    """The arm this one adds its keys to (``extends``, with the same axis values), None for a root arm."""


@dataclass(frozen=True)
class RunSpec:
    grid: str
    arm: str
    seed: int
    overrides: dict[str, Any]
    config: Config
    config_hash: str
    """``twinflow_train.config.config_hash`` of the resolved config (what the trainer writes in status.json)."""
    identity: str
    """Hash of (resolved config incl. seed, code version)."""
    run_dir: Path

    @property
    def key(self) -> str:
        return f"{self.arm}/seed-{self.seed}"


@dataclass(frozen=True)
class Grid:
    name: str
    matrix_path: Path
    base_path: Path
    root: Path
    seeds: tuple[int, ...]
    arms: tuple[ArmSpec, ...]
    runs: tuple[RunSpec, ...]
    code_version: str
    claims: tuple[Claim, ...] = ()
    """The ``claims:`` block (see harness/claims.py): which arm pair tests which claim."""
    plan: SeedPlan | None = None
    """The sequential seed plan (``seeds: {first, max}``), None for a plain seed list (every run at once)."""

    @property
    def grid_dir(self) -> Path:
        return self.root / self.name


# --------------------------------------------------------------------------- dotted keys


def flatten(mapping: Mapping[Any, Any], *, where: str, problems: list[str], prefix: str = "") -> dict[str, Any]:
    """Nested mappings and dotted keys -> one dotted-key dict; a key given twice is a problem."""
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


def nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted-key dict -> the nested mapping the trainer config loader reads."""
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        set_dotted(tree, key.split("."), value)
    return tree


def _format_axis_value(value: Any) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    text = text.removesuffix("\n...").strip()
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def strip_file(message: str, base: Path) -> str:
    """A trainer config problem without its file prefix (the caller names the file its own way)."""
    prefix = f"{base}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _resolve(base: Path, overrides: Mapping[str, Any]) -> Config:
    return load_config(base, nested(overrides))


def _canonical_hash(cfg: Config) -> str:
    """Hash of a config with the per-run keys the harness sets blanked: equal means the arms are the same experiment."""
    data = to_dict(cfg)
    data["run"]["seed"] = 0
    data["telemetry"]["group"] = None
    data["telemetry"]["name"] = None
    return config_hash(data, length=64)


# --------------------------------------------------------------------------- the file


def name_problem(name: str, *, role: str = "the grid and its directory") -> str | None:
    """The problem with a grid's or a study's ``name`` (it becomes a directory), or None."""
    if _NAME_RE.match(name):
        return None
    return f"must be a string of letters, digits, '_', '.', '-' (got {name!r}); it names {role}"


def seeds_problem(seeds: "list[int] | SeedPlan", *, why: str = "") -> str | None:
    """The problem with a ``seeds`` list (non-empty, in range, no repeats), or None; ``why`` ends the message.
    A sequential plan (``SeedPlan``) checks itself."""
    if isinstance(seeds, SeedPlan):
        return None
    if not seeds or any(s < 0 for s in seeds):
        return f"expected a non-empty list of integers in [0, 2**31 - 1] (got {seeds!r}){why}"
    return f"has duplicates ({seeds})" if len(set(seeds)) != len(seeds) else None


@dataclass(kw_only=True, slots=True)
class MatrixFile:
    """An ablation matrix file as written (the format is in docs/harness.md)."""

    name: str | None = checked(None, check=name_problem)
    """The grid: ``runs/<name>/``; default: the file's stem."""
    description: str = ""
    base: str = checked(missing="the trainer config the arms override, relative to this file")
    seeds: list[int] | SeedPlan = checked(
        check=seeds_problem, expect="a non-empty list of integers in [0, 2**31 - 1], or a sequential plan "
                                    "{first, max, step, spending} (harness/sequential.py)",
        missing="a non-empty list of integers, or a sequential plan {first, max}")
    """The seeds every arm runs, or a sequential plan: seeds given in waves where claims are still open."""
    vars: dict[str, bool | int | float | str] | None = None
    """Names usable in ``${expr}`` values."""
    overrides: dict[str, Any] | None = None
    """Dotted keys applied to every arm first."""
    axes: dict[str, list[Any]] | None = None
    """Dotted key -> values: every arm runs at every combination."""
    arms: dict[str, dict[str, Any] | None] = checked(
        check=lambda arms: None if arms else "expected a non-empty mapping of arm name -> dotted overrides, got {}",
        expect="a non-empty mapping of arm name -> dotted overrides", missing="a mapping of arm name -> dotted overrides")
    claims: list[Any] | None = None
    """Which arm pair tests which claim (harness/claims.py reads them)."""

    def __post_init__(self) -> None:
        out: list[tuple[str | None, str]] = []
        out += [(None, f"vars: {k!r} is not a valid variable name") for k in self.vars or {} if not _VAR_RE.match(k)]
        for k, values in (self.axes or {}).items():
            if any(not p for p in k.split(".")):
                out.append((None, f"axes: {k!r} is not a dotted config key"))
            elif not values:
                out.append((None, f"axes: '{k}' must be a non-empty list of values (got [])"))
        for arm, body in self.arms.items():
            if not _NAME_RE.match(arm):
                out.append((None, f"arm name {arm!r} must be letters, digits, '_', '.', '-' (it names the run "
                                  f"directory)"))
            parent = (body or {}).get(ARM_EXTENDS)
            if parent is not None and (not isinstance(parent, str) or parent not in self.arms):
                out.append((None, f"arm '{arm}', key '{ARM_EXTENDS}': no arm named {parent!r}"))
            elif parent is not None and (cycle := self._cycle(arm)):
                out.append((None, f"arm '{arm}', key '{ARM_EXTENDS}': cycle ({' -> '.join(cycle)})"))
        raise_problems(out)

    def _cycle(self, arm: str) -> list[str]:
        chain: list[str] = []
        node: str | None = arm
        while node is not None:
            if node in chain:
                return chain + [node]
            chain.append(node)
            node = (self.arms.get(node) or {}).get(ARM_EXTENDS)
        return []

    def chain(self, arm: str) -> list[str]:
        """``arm`` and its ``extends`` ancestors, the root last."""
        out: list[str] = []
        node: str | None = arm
        while node is not None:
            out.append(node)
            node = (self.arms[node] or {}).get(ARM_EXTENDS)
        return out


# --------------------------------------------------------------------------- load


def _check_base(matrix_path: Path, base: Any, problems: list[str]) -> Path | None:
    """The base config's path when it loads; its problems (named as the matrix's) otherwise."""
    if not isinstance(base, str):
        return None  # the file's own reading names it
    file = str(matrix_path)
    base_path = (matrix_path.parent / base).resolve()
    if not base_path.is_file():
        problems.append(f"{file}: base config '{base}' does not exist (looked at {base_path})")
        return None
    try:
        load_config(base_path)
    except ConfigError as e:
        problems.extend(f"{file}: base config {base_path}: {strip_file(p, base_path)}" for p in e.problems)
        return None
    return base_path


def _arm_specs(m: MatrixFile, file: str, env: Mapping[str, Any], problems: list[str]) -> tuple[dict[str, Any],
                                                                                               list[ArmSpec]]:
    """The top-level overrides and every arm's dotted overrides: ``${}`` evaluated, ``extends`` and axes applied."""

    def dotted(over: Mapping[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for k, v in flatten(over, where=where, problems=problems).items():
            if k in RESERVED_KEYS:
                problems.append(f"{where}, key '{k}': set by the harness for every run "
                                f"(seeds come from 'seeds', telemetry group/name from the grid and arm)")
            try:
                out[k] = evaluate(v, env)
            except (ValueError, TypeError) as e:
                problems.append(f"{where}, key '{k}': {e}")
        return out

    top = dotted(m.overrides or {}, f"{file}: overrides")
    axes = dotted(m.axes or {}, f"{file}: axes")
    own = {arm: dotted({k: v for k, v in (body or {}).items() if k != ARM_EXTENDS}, f"{file}: arm '{arm}'")
           for arm, body in m.arms.items()}
    arms: list[ArmSpec] = []
    for arm in own:
        merged = dict(top)
        for ancestor in reversed(m.chain(arm)):
            merged.update(own[ancestor])
        parent = (m.arms.get(arm) or {}).get(ARM_EXTENDS)
        for combo in itertools.product(*axes.values()):
            axis_over = dict(zip(axes, combo))
            suffix = [f"{k}={_format_axis_value(v)}" for k, v in axis_over.items()]
            arms.append(ArmSpec(name="+".join([arm] + suffix), overrides={**merged, **axis_over},
                                extends=None if parent is None else "+".join([parent] + suffix)))
    return top, arms


def load_matrix(path: str | Path, *, root: str | Path = "runs", code_version: str | None = None) -> Grid:
    """Parse and validate a matrix file; raises ``MatrixError`` listing every problem. Writes nothing."""
    matrix_path = Path(path)
    file = str(matrix_path)
    data = read_matrix_yaml(matrix_path)
    problems: list[str] = []
    base_path = _check_base(matrix_path, data.get("base"), problems)
    try:
        m = from_dict(MatrixFile, data, Where(file=file))
    except ConfigError as e:
        raise MatrixError(problems + e.problems) from None
    name = m.name or matrix_path.stem
    plan = m.seeds if isinstance(m.seeds, SeedPlan) else None
    seeds = list(plan.seeds) if plan is not None else list(m.seeds)
    if plan is not None and not m.claims:
        raise MatrixError([f"{file}, key 'seeds': a sequential plan gives seeds where claims are still open; this "
                           f"matrix declares no claims (give a list of seeds instead)"])
    env = dict(m.vars or {})
    top, arms = _arm_specs(m, file, env, problems)
    if problems or base_path is None:
        raise MatrixError(problems)

    if top:
        try:
            _resolve(base_path, top)
        except ConfigError as e:
            raise MatrixError(_blame(base_path, {}, ArmSpec(name="overrides", overrides=top),
                                     f"{file}: overrides", e)) from None

    code = code_version if code_version is not None else trainer_code_version()
    root = Path(root)
    runs: list[RunSpec] = []
    by_hash: dict[str, str] = {}
    arm_configs: dict[str, Config] = {}
    wandb_missing = importlib.util.find_spec("wandb") is None
    for spec in arms:
        where = f"{file}: arm '{spec.name}'"
        try:
            cfg = _resolve(base_path, spec.overrides)
        except ConfigError as e:
            problems.extend(_blame(base_path, top, spec, where, e))
            continue
        canon = _canonical_hash(cfg)
        if canon in by_hash:
            problems.append(f"{where}: resolves to the same config as arm '{by_hash[canon]}' "
                            f"(overrides {spec.overrides or '{}'}); two arms must differ")
            continue
        by_hash[canon] = spec.name
        arm_configs[spec.name] = cfg
        if wandb_missing and cfg.telemetry.wandb in ("offline", "online"):
            problems.append(f"{where}, key 'telemetry.wandb': '{cfg.telemetry.wandb}' needs the wandb package, "
                            "which is not installed (pip install 'twinflow-lab[wandb]')")
            continue
        for seed in seeds:
            run_over = {**spec.overrides, "run.seed": seed, "telemetry.group": name,
                        "telemetry.name": f"{spec.name}-{seed}"}
            run_cfg = _resolve(base_path, run_over)
            runs.append(RunSpec(grid=name, arm=spec.name, seed=seed, overrides=dict(spec.overrides),
                                config=run_cfg, config_hash=config_hash(run_cfg),
                                identity=run_identity(run_cfg, code),
                                run_dir=root / name / spec.name / f"seed-{seed}"))
    claims = () if problems else parse_claims(m.claims, file=file, arms=arm_configs,
                                              evaluate=lambda v: evaluate(v, env), problems=problems)
    if problems:
        raise MatrixError(problems)
    return Grid(name=name, matrix_path=matrix_path, base_path=base_path, root=root, seeds=tuple(seeds),
                arms=tuple(arms), runs=tuple(runs), code_version=code, claims=claims, plan=plan)


def _blame(base: Path, top: Mapping[str, Any], spec: ArmSpec, where: str, error: ConfigError) -> list[str]:
    """Name the override key(s) that make an arm invalid: each key alone on top of the base (+ overrides)."""
    own = {k: v for k, v in spec.overrides.items()
           if not (k in top and top[k] == v and spec.name != "overrides")}  # top-level ones resolve on their own
    alone: dict[str, list[str]] = {}
    for key, value in own.items():
        try:
            _resolve(base, {**top, key: value})
        except ConfigError as e:
            alone[key] = [strip_file(p, base) for p in e.problems]
    # a key that fails alone only for want of its companions (rl.enabled without the arm's rl.reward) is not a
    # problem of its own: it must also fail beside the arm's keys that are fine alone, and a message about
    # another key the arm sets is left to that key's own line
    fine = {k: v for k, v in own.items() if k not in alone}
    culprits = []
    for key, texts in alone.items():
        texts = [t for t in texts if not any(t.startswith((f"{o} ", f"{o}:")) for o in own if o != key)]
        if not texts:
            continue
        try:
            _resolve(base, {**top, **fine, key: own[key]})
        except ConfigError:
            culprits.extend(f"{where}, key '{key}': {t}" for t in texts)
    if culprits:
        return culprits
    # no single key fails: a combination does (e.g. batch size vs groups); name them all
    keys = ", ".join(f"'{k}'" for k in spec.overrides) or "(none)"
    return [f"{where}, keys {keys}: {strip_file(p, base)}" for p in error.problems]
