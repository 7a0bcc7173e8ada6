"""One reading path for every YAML file the project accepts, and the number checks they share.

Trainer configs, ablation matrices (and their base configs) and search specs are all
read by ``read_mapping``: the bytes must be UTF-8, the YAML must parse, the file must
not be empty, no key may appear twice in one mapping (plain loaders keep the last one
silently), and the top level must be a mapping. Every problem is an ``InputError``
whose ``problems`` each name the file (and line where there is one); the command-line
entry points print them and exit with status 2 before anything is written.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

# Integers in an input file are counts, sizes, steps or seeds: all fit in a signed 32-bit int, and a larger
# one is a typo that would otherwise surface as an overflow deep inside torch or numpy.
INT_MAX = 2**31 - 1
INT_MIN = -(2**31)


class InputError(ValueError):
    """Input that cannot be used; ``problems`` lists every problem found, each naming file and key."""

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        super().__init__("\n".join(self.problems))


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``): lr values are written that way."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


# --------------------------------------------------------------------------- numbers


def number_problem(value: Any, *, integer: bool = False) -> str | None:
    """Why ``value`` is not a usable number (None: it is): bools, non-finite floats, out-of-range integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected {'an integer' if integer else 'a number'}, got {value!r}"
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            return f"integer {_short(value)} is out of range [{INT_MIN}, {INT_MAX}]"
        return None
    if integer:
        return f"expected an integer, got {value!r}"
    if not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    return None


def is_number(value: Any, *, integer: bool = False) -> bool:
    return number_problem(value, integer=integer) is None


def float_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable float (None: it is); an integer counts if ``float()`` can hold it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value.bit_length() <= 1023 else f"number {_short(value)} is too large for a float"
    return number_problem(value)


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-4:]} ({len(text)} digits)"


# --------------------------------------------------------------------------- files


def _mark(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _decode(data: bytes, file: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError([f"{file}: not UTF-8 text (byte 0x{data[e.start]:02x} at line {line}); "
                          f"save the file as UTF-8"]) from None


# values in a document once aliases are expanded: far above any real config, far below what an alias
# bomb ("billion laughs") expands to, which would otherwise hang every walk over the data
MAX_VALUES = 100_000


def _check_nodes(node: yaml.Node, file: str, *, named: dict[str, str]) -> list[str]:
    """Duplicate keys anywhere in the document (with their lines); too many values once aliases expand."""
    out: list[str] = []
    count = 0
    stack: list[tuple[yaml.Node, str]] = [(node, "")]
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise InputError([f"{file}: more than {MAX_VALUES} values once its aliases (*name) are expanded"])
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if key is not None and key != "<<":
                    if key in seen:
                        what = f"{named[path]} '{key}'" if path in named else (
                            f"key '{key}' in '{path}'" if path else f"key '{key}'")
                        out.append(f"{file}: duplicate {what} (lines {seen[key]} and {line})")
                    else:
                        seen[key] = line
                child = f"{path}.{key}" if path and key is not None else (key or path)
                stack.append((value_node, str(child)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, path) for item in node.value)
    return sorted(out, key=lambda p: int(re.search(r"lines \d+ and (\d+)", p).group(1)))


def parse_text(text: str, *, file: str, named: dict[str, str] | None = None) -> Any:
    """The YAML document in ``text``; syntax errors (with the line), duplicate keys and emptiness are errors.

    ``named``: mapping path -> noun for duplicate messages, e.g. ``{"arms": "arm name"}``.
    """
    try:
        node = yaml.compose(text, Loader=Loader)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow; it carries a position, not a mark
        line = text[:e.position].count("\n") + 1
        raise InputError([f"{file}: YAML syntax error at line {line}: character #x{e.character:04x} "
                          f"is not allowed in YAML"]) from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise InputError([f"{file}: YAML syntax error{_mark(getattr(e, 'problem_mark', None))}: {problem}"]) from None
    except RecursionError:
        raise InputError([f"{file}: nested too deeply to read"]) from None
    if node is None:
        raise InputError([f"{file}: the file is empty"])
    dups = _check_nodes(node, file, named=named or {})
    if dups:
        raise InputError(dups)
    try:
        return Loader(text).get_single_data()
    except yaml.YAMLError as e:  # a constructor error: a tag or value the safe loader does not build
        problem = getattr(e, "problem", None) or str(e)
        raise InputError([f"{file}: cannot read{_mark(getattr(e, 'problem_mark', None))}: {problem}"]) from None
    except RecursionError:
        raise InputError([f"{file}: nested too deeply to read"]) from None


def read_mapping(path: str | Path, *, kind: str, top_keys: Sequence[str] | None = None,
                 named: dict[str, str] | None = None) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ``kind`` names the file in messages ("matrix", "config", ...)."""
    p = Path(path)
    file = str(p)
    if not p.exists():
        raise InputError([f"{file}: {kind} file does not exist"])
    if not p.is_file():
        raise InputError([f"{file}: {kind} file is not a regular file"])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError([f"{file}: {kind} file cannot be read ({e.strerror or e})"]) from None
    out = parse_text(_decode(data, file), file=file, named=named)
    if not isinstance(out, dict):
        keys = f" with keys {', '.join(top_keys)}" if top_keys else ""
        raise InputError([f"{file}: the top level must be a mapping{keys} (got {type(out).__name__})"])
    return out


def parse_value(text: str, *, where: str) -> Any:
    """One command-line value (``key=VALUE``) read as YAML the way files are; an empty value is null."""
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError([f"{where}: value is not valid YAML ({problem})"]) from None
    except RecursionError:
        raise InputError([f"{where}: value is nested too deeply"]) from None


@contextlib.contextmanager
def reading_input(what: str) -> Iterator[None]:
    """Run the input-checking phase of a command: any exception in it is a problem of the input (exit 2).

    Only the reading and checking of files and arguments runs inside; what a command does
    after its input is accepted runs outside, so a real internal error keeps its traceback.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the user as an input problem, not swallowed
        raise InputError([f"{what}: {type(e).__name__}: {e}"]) from e


def dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a directory (None: it can), found without creating anything."""
    p = Path(path)
    if p.exists():
        return None if p.is_dir() else f"{p} exists and is not a directory"
    for parent in p.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is not a directory"
    return None
