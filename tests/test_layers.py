"""The import structure the README promises, read from the source (no imports run).

- The packages stack ``twinflow_train`` < ``harness`` < ``reports`` < ``twinflow_lab``: nothing imports a package above it.
- Inside ``twinflow_train`` the sub-packages stack in ``TRAINER_LAYERS``: a module imports, at module level, only its
  own sub-package and those before it. The function-level imports that reach up are listed in ``LATE_BINDING``, each
  with its reason; a new one fails here until it is listed (or moved down).
- No import circle between modules, counting function-level imports too.
- No module imports another module's private name (``from .grid import _start``).
- Imports sit at the top of their module. One inside a function (or class) has its reason beside it, a comment
  ``# lazy: <reason>`` on its line, or on the comment line(s) right above it or above the run of imports it
  belongs to. The reasons: an optional dependency (diffusers, optuna's sqlalchemy, ...), an import cost a command
  must not pay (``--help`` without torch, pandas or optuna), a layer that must not load another at module level
  (``LATE_BINDING``), a module read by others that stays free of what one function needs.
  ``python tests/test_layers.py`` prints the counts.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("twinflow_train", "harness", "reports", "twinflow_lab")
TRAINER_LAYERS = ("yamlio", "progress", "inputs", "config", "rundir", "distributed", "models", "data", "assets",
                  "method", "rl", "evaluation", "run", "cli")
LATE_BINDING = {
    # the family registry names each family's exporter; the exporter reads run directories and checkpoints
    ("twinflow_train.models.registry", "twinflow_train.run.export"),
    # a Qwen-Image model built for shards takes the empty prompt's embedding stored with them
    ("twinflow_train.models.qwen_image", "twinflow_train.data.shards"),
}
REASON = re.compile(r"#\s*lazy:\s*\S")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges() -> list[tuple[str, str, list[str], bool]]:
    """(importer, imported module, imported names, at module level) for every project import."""
    modules = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in tree.body}
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [a.name for a in node.names]
                # ``from pkg import module`` imports the module
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                for t in subs or [target]:
                    out.append((name, t, [] if subs else names, id(node) in top))
            elif isinstance(node, ast.Import):
                out += [(name, a.name, [], id(node) in top) for a in node.names]
    return [e for e in out if e[1] in modules]  # the project's own modules and packages (``__init__``)


EDGES = _edges()


def _late_imports() -> list[tuple[str, int, bool, bool]]:
    """(file, line, of the project's own modules, has its reason) for every import inside a function or class."""
    out = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        late = {id(n): n for s in scopes for n in ast.walk(s) if isinstance(n, (ast.Import, ast.ImportFrom))}
        starts = {n.end_lineno: n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in late.values():
            if isinstance(node, ast.ImportFrom):
                own = bool(node.level) or node.module.split(".")[0] in PACKAGES
            else:
                own = any(a.name.split(".")[0] in PACKAGES for a in node.names)
            out.append((str(path.relative_to(ROOT)), node.lineno, own, _has_reason(lines, node, starts)))
    return sorted(out)


def _has_reason(lines: list[str], node: ast.stmt, starts: dict[int, int]) -> bool:
    """A ``# lazy:`` comment on the import's lines, or on the comment lines right above it or above the run of
    imports (blank lines between them allowed) it belongs to."""
    if any(REASON.search(lines[i - 1]) for i in range(node.lineno, node.end_lineno + 1)):
        return True
    i = node.lineno - 1
    while i > 0:
        line = lines[i - 1].strip()
        if i in starts:  # the line above ends another import: look above that one
            i = starts[i] - 1
        elif not line:
            i -= 1
        elif line.startswith("#"):
            if REASON.search(line):
                return True
            i -= 1
        else:
            return False
    return False


def _layer(module: str) -> int:
    parts = module.split(".")
    return TRAINER_LAYERS.index(parts[1]) if len(parts) > 1 else -1


def test_no_package_imports_one_above_it():
    up = [(a, b) for a, b, _, _ in EDGES if PACKAGES.index(b.split(".")[0]) > PACKAGES.index(a.split(".")[0])]
    assert up == []


def test_trainer_sub_packages_import_only_those_below_them():
    trainer = [(a, b, top) for a, b, _, top in EDGES if a.startswith("twinflow_train.") and b.startswith("twinflow_train.")]
    assert {m.split(".")[1] for a, b, _ in trainer for m in (a, b)} <= set(TRAINER_LAYERS)
    up = {(a, b, top) for a, b, top in trainer if _layer(b) > _layer(a)}
    assert {(a, b) for a, b, top in up if top} == set(), "module-level imports reach up"
    assert {(a, b) for a, b, _ in up} == LATE_BINDING


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in EDGES:
        if a != b and not a.startswith(b + "."):  # a package's own modules importing its __init__ is not a circle
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_is_imported_from_another_module():
    private = [(a, b, n) for a, b, names, _ in EDGES for n in names if n.startswith("_") and a != b]
    assert private == []


def test_every_function_level_import_has_its_reason():
    late = _late_imports()
    missing = [f"{f}:{line}" for f, line, _, reason in late if not reason]
    assert missing == [], "import inside a function without a '# lazy: <reason>' comment (or move it to the top)"


def test_a_reason_stands_beside_its_import_or_above_its_run_of_imports():
    source = """\
def f():
    import a  # lazy: beside it
    # lazy: above the run
    import b
    from c import d

    import e
    x = 1
    import g
    # a comment that gives no reason
    import h
"""
    tree = ast.parse(source)
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    starts = {n.end_lineno: n.lineno for n in nodes}
    got = {(n.names[0].name if isinstance(n, ast.Import) else n.module): _has_reason(source.splitlines(), n, starts)
           for n in nodes}
    assert got == {"a": True, "b": True, "c": True, "e": True, "g": False, "h": False}


if __name__ == "__main__":  # the counts: every function-level import, those of the project's own modules
    late = _late_imports()
    for label, rows in (("all", late), ("project modules", [r for r in late if r[2]])):
        print(f"{label}: {len(rows)} function-level imports, {sum(r[3] for r in rows)} with a reason")
    if "-v" in sys.argv:
        print("\n".join(f"{f}:{line}" + (" (own)" if own else "") for f, line, own, reason in late if not reason))
