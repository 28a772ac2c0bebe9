"""recipe.retool.sandbox as a boundary: its modules import one another one way only (no cycle, hidden
in a function body or not), and nothing of the recipe outside the package.

The source is read with ``ast``, never imported: an import inside a function, under ``TYPE_CHECKING``
or after a ``try`` counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = "recipe.retool.sandbox"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "recipe" / "retool" / "sandbox"
_DOTTED = re.compile(r"recipe(\.\w+)+")


def modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package, by its dotted name (``__init__`` as the package itself)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((PACKAGE, *parts))] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """The dotted names module ``name`` imports, anywhere in its source. ``from a import b`` gives
    ``a.b`` (which may be a module or an attribute of ``a``: :func:`resolve` tells); relative imports
    are made absolute."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def resolve(imported: str, known: set[str]) -> str | None:
    """The package's module that ``imported`` names (the longest known prefix), or None."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module → the package's modules it imports (the package's ``__init__`` itself left out: importing
    any submodule runs it, so it is no edge of a layering)."""
    mods = modules(package_dir)
    known = set(mods) - {PACKAGE}
    graph = {}
    for name, path in mods.items():
        targets = {resolve(n, known) for n in imported_names(name, path)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path that closes it (``[a, b, a]``)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loop = path[path.index(nxt):] + [nxt]
                if frozenset(loop) not in seen:
                    seen.add(frozenset(loop))
                    found.append(loop)
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def outside_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Imports of the recipe that lie outside the package (``recipe``, ``recipe.retool``,
    ``recipe.retool.tools``, …), and module names of the recipe spelled out in strings (``python -m``)."""
    bad = []
    for name, path in modules(package_dir).items():
        for imported in sorted(imported_names(name, path)):
            top = imported.split(".")[0]
            if top == "recipe" and not (imported == PACKAGE or imported.startswith(PACKAGE + ".")):
                bad.append(f"{name} imports {imported}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
                if not node.value.startswith(PACKAGE):
                    bad.append(f"{name} names {node.value}")
    return bad


def test_the_sandbox_imports_itself_one_way_only():
    graph = import_graph()
    assert {"recipe.retool.sandbox.server", "recipe.retool.sandbox.fronts", "recipe.retool.sandbox.app",
            "recipe.retool.sandbox.pool", "recipe.retool.sandbox.worker"} <= set(graph)
    assert graph["recipe.retool.sandbox.server"] >= {"recipe.retool.sandbox.fronts", "recipe.retool.sandbox.app"}
    assert cycles(graph) == []


def test_the_sandbox_imports_nothing_of_the_recipe():
    assert outside_imports() == []


def test_the_checks_see_imports_hidden_in_function_bodies(tmp_path):
    """The checks themselves: a cycle closed inside a function and a relative import of the recipe
    are both found."""
    pkg = tmp_path / "sandbox"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""pkg"""\n')
    (pkg / "a.py").write_text("from recipe.retool.sandbox import b\n")
    (pkg / "b.py").write_text("def f():\n    from recipe.retool.sandbox.a import g\n    from .. import train\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["recipe.retool.sandbox.a", "recipe.retool.sandbox.b", "recipe.retool.sandbox.a"]]
    assert outside_imports(pkg) == ["recipe.retool.sandbox.b imports recipe.retool",
                                    "recipe.retool.sandbox.b imports recipe.retool.train"]
