"""The import structure the README promises, read from the source (no imports run).

- The packages stack ``twinflow_train`` < ``harness`` < ``reports`` < ``twinflow_lab``: nothing imports a package above it.
- Inside ``twinflow_train`` the sub-packages stack in ``TRAINER_LAYERS``: a module imports, at module level, only its
  own sub-package and those before it. The function-level imports that reach up are listed in ``LATE_BINDING``, each
  with its reason; a new one fails here until it is listed (or moved down).
- No import circle between modules, counting function-level imports too.
- No module imports another module's private name (``from .grid import _start``).
"""

from __future__ import annotations

import ast
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
