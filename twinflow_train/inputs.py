"""The typed-input language every input file of the project is read with: the trainer's config sections and
the harness's formats (matrices, search specs, claims, seed plans).

A *section* is a keyword-only slotted dataclass (``@section``) whose ``Literal`` fields are checked however it is
built; ``from_dict`` builds one from a mapping, reporting every problem of the input at once in one
``ConfigError`` whose lines name the place (``Where``: ``optim.lr`` in a trainer config, ``F: claims[0], key
'window'`` in another file); ``checked`` gives a field its own rule and hints; ``parse_overrides``,
``set_dotted`` and ``deep_merge`` apply ``section.key=value`` overrides; ``to_dict``, ``to_yaml`` and
``config_hash`` write a section back out as plain data, YAML and a stable hash. ``twinflow_train.config``
declares the trainer's sections in this language.

A section's ``__post_init__`` checks its fields (``require``) and raises ``ValueError`` whose message starts with
the field name; ``from_dict`` prefixes the section path, so errors read ``method.estimate_order must be >= 1``.
Unknown keys are rejected at every level with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import yaml

from .yamlio import InputError, float_problem, number_problem, parse_value


class ConfigError(InputError):
    """A configuration that cannot be used; each of ``problems`` names the offending key."""


def _choices(hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` (or ``Literal[...] | None``) hint; None for any other type."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        lits = [a for a in args if typing.get_origin(a) is Literal]
        if lits and all(a is type(None) or a in lits for a in args):
            return tuple(v for a in lits for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


def section(cls: type) -> type:
    """A config section: a keyword-only slotted dataclass whose ``Literal`` fields are checked on construction.

    The check runs before the section's own ``__post_init__``, however the section is built (the
    loader, a test, a caller's code), so code that receives a section can trust every option string
    in it: an unknown value is a ``ValueError`` naming the field and the valid values.
    """
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self: Any) -> None:
        for name, hint in _section_choices(type(self)).items():
            value = getattr(self, name)
            if value not in hint:
                raise ValueError(f"{name}: unknown value {value!r}; valid: {', '.join(map(repr, hint))}")
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return dataclass(kw_only=True, slots=True)(cls)


_CHOICES: dict[type, dict[str, tuple[Any, ...]]] = {}


def _section_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """Field -> allowed values for the ``Literal`` fields of section ``cls`` (resolved once per class)."""
    if cls not in _CHOICES:
        hints = typing.get_type_hints(cls)
        _CHOICES[cls] = {f.name: c for f in dataclasses.fields(cls) if (c := _choices(hints[f.name])) is not None}
    return _CHOICES[cls]


def literal_values(cls: type, name: str) -> tuple[Any, ...]:
    """The valid values of the ``Literal`` field ``name`` of config section ``cls``.

    Functions that are also called without a config (plain keyword arguments) check their
    option against this, so the config's type is the one list of valid strings.
    """
    return _section_choices(cls)[name]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class Where:
    """Where a value sits, written the way its file's messages name places.

    Trainer configs write dotted paths (``optim.lr``, ``eval.nfe[1]``); other input files
    (``file`` set: matrices, search specs) write ``F: objective, constraints[0], key 'max'``
    with the names of user-chosen mapping keys quoted (``F: parameters, 'rl.weight'``).
    """

    file: str | None = None
    parts: tuple[str, ...] = ()

    def key(self, name: str, *, item: bool = False) -> Where:
        return Where(self.file, self.parts + (f"'{name}'" if item and self.file is not None else name,))

    def index(self, i: int) -> Where:
        return Where(self.file, self.parts[:-1] + (f"{self.parts[-1]}[{i}]",))

    def section(self) -> str:
        """Where a mapping's own problems (unknown keys, its checks across fields) are written."""
        if self.file is None:
            return ".".join(self.parts) or "config"
        return f"{self.file}: {', '.join(self.parts)}" if self.parts else self.file

    def field(self) -> str:
        """Where the problems of one value are written."""
        if self.file is None:
            return ".".join(self.parts)
        *context, last = self.parts
        last = last if last.startswith("'") else f"key '{last}'"
        return f"{self.file}: {', '.join(context)}, {last}" if context else f"{self.file}, {last}"

    def own(self, message: str) -> str:
        """A section's own check: the trainer's read ``run.steps must be ...``, the files' ``F: objective: ...``."""
        if self.file is None:
            return f"{'.'.join(self.parts)}.{message}" if self.parts else message
        return f"{self.section()}: {message}"


def require(ok: bool, message: str) -> None:
    """A section's check in its ``__post_init__``: ``ValueError(message)`` unless ``ok`` (the message starts with
    the field name; ``from_dict`` prefixes the section path)."""
    if not ok:
        raise ValueError(message)


class SectionProblems(ValueError):
    """Raised by a ``__post_init__`` with several problems; each is ``(field or None, text)``."""

    def __init__(self, items: Sequence[tuple[str | None, str]]):
        self.items = list(items)
        super().__init__("; ".join(text for _, text in self.items))


def raise_problems(items: Sequence[tuple[str | None, str]]) -> None:
    """End a ``__post_init__`` that collected its problems: raise them all together, if any."""
    if items:
        raise SectionProblems(items)


def checked(default: Any = dataclasses.MISSING, *, check: Callable[[Any], str | None] | None = None,
            expect: str | None = None, missing: str | None = None, **kw: Any) -> Any:
    """A dataclass field with loader metadata.

    ``check(value)``: the field's own rule (a problem text or None), run whatever the other fields
    hold, so every problem of a file is found in one reading. ``expect``: what a value of the wrong
    type is told it should be (instead of the item-level message). ``missing``: the hint of a
    required field's absence.
    """
    meta = {k: v for k, v in (("check", check), ("expect", expect), ("missing", missing)) if v is not None}
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata=meta, **kw)


def at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"expected an integer >= {low}, got {v!r}"


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shape_fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the shape of ``tp`` (a mapping for a section, a list for a list, ...)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_shape_fits(a, value) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is Literal:
        return any(type(a) is type(value) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _coerce(tp: Any, value: Any, where: Where) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    path = where.field()
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for arg in options:
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        # the message of the option the value was meant for (the last one of its shape: int, then float)
        fitting = [e for arg, e in zip(options, errors) if _shape_fits(arg, value)]
        if len(options) == 1 or fitting:
            raise (fitting or errors)[-1]
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args or not any(type(a) is type(value) for a in args):
            raise ConfigError(f"{path}: unknown value {value!r}; valid values: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = args[:1] or (Any,)
        problems: list[str] = []
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(item, v, where.index(i)))
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        problems, out_map = [], {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.append(f"{where.section()}: key {k!r} is not a string")
                continue
            try:
                out_map[k] = _coerce(args[1], v, where.key(k, item=True))
            except ConfigError as e:
                problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)
        return out_map
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        problem = number_problem(value, integer=True)
        if problem is not None:
            raise ConfigError(f"{path}: {problem}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number to anyone writing a config
            value = float(value)
        problem = float_problem(value)
        if problem is not None:
            raise ConfigError(f"{path}: {problem}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if "\0" in value:
            raise ConfigError(f"{path}: contains a NUL character")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def _field_value(f: dataclasses.Field, tp: Any, value: Any, where: Where) -> Any:
    """One field coerced to its type, then its own ``check``; raises ``ConfigError`` with every problem."""
    try:
        out = _coerce(tp, value, where)
    except ConfigError as e:
        if "expect" in f.metadata and not _shape_fits(tp, value):  # the item's own message is the precise one
            raise ConfigError(f"{where.field()}: expected {f.metadata['expect']}, got {value!r}") from None
        raise
    check = f.metadata.get("check")
    problem = check(out) if check is not None and out is not None else None
    if problem is not None:
        raise ConfigError(f"{where.field()}: {problem}")
    return out


def from_dict(cls: type, data: Any, path: str | Where = "") -> Any:
    """Build dataclass ``cls`` from a mapping, reporting every problem at once in one ``ConfigError``.

    Unknown keys, missing required fields and values of the wrong type are collected over the
    whole tree, and each field's own ``check`` runs whatever its neighbours hold; a section's
    ``__post_init__`` (its rules across fields) runs once its fields are all usable.
    ``path``: a dotted trainer-config prefix, or a ``Where`` naming the file and place.
    """
    where = path if isinstance(path, Where) else Where(parts=tuple(path.split(".")) if path else ())
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where.field() if where.parts else where.file or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            top = "top-level " if where.file is not None and not where.parts else ""
            problems.append(f"{where.section()}: unknown {top}key '{key}'; valid keys: {', '.join(fields)}")
            continue
        try:
            kwargs[key] = _field_value(fields[key], hints[key], value, where.key(key))
        except ConfigError as e:
            problems.extend(e.problems)
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            hint = f" ({f.metadata['missing']})" if "missing" in f.metadata else ""
            problems.append(f"{where.section()}: '{name}' is missing{hint}")
    if problems:
        # a section's own checks (__post_init__) only run on values of the right types
        raise ConfigError(problems)
    try:
        return cls(**kwargs)
    except SectionProblems as e:
        raise ConfigError([f"{where.key(k).field()}: {t}" if k else where.own(t) for k, t in e.items]) from None
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(where.own(str(e))) from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["method.rl.weight=0.05", ...]`` -> nested dict; values parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = parse_value(raw, where=f"override {item!r}")
        except InputError as e:
            raise ConfigError(e.problems) from None
        set_dotted(tree, parts, value)
    return tree


def set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------- a section written back out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A section (its nested sections included) as plain dicts and lists."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """A section as YAML, fields in declaration order: what ``from_dict`` reads back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hash of a config (or any dataclass / JSON-able value)."""
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
