"""The house drawn from the imports: no circle, and no upward import.

Layers, lowest first: ``sandbox`` (imports nothing of the recipe) · ``perf`` (launch-time choices)
· the recipe's own modules (``recipe.retool.*``) · ``cloud`` (the Modal launcher) · ``dev``
(development scaffolding, which may use everything). Production code — everything but ``dev`` —
never imports ``dev``. Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

from recipe.retool import PACKAGE_DIR

LAYERS = {"sandbox": 0, "perf": 1, "core": 2, "cloud": 3, "dev": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    rest = module.split(".")[2:]  # recipe.retool.<rest>
    return rest[0] if rest and rest[0] in LAYERS else "core"


def imports(path: Path, known: set[str]) -> set[str]:
    """The recipe modules ``path`` imports (``from pkg import module`` resolved to the module)."""
    found = set()
    here = module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n in known} or ({target} if target in known else set())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {here}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    known = set(paths)
    return {name: imports(path, known) - {"recipe", "recipe.retool"} for name, path in paths.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_layer_of_a_module():
    assert [layer(m) for m in ("recipe.retool.train", "recipe.retool.sandbox.pool", "recipe.retool.perf.kernels",
                               "recipe.retool.cloud.launcher", "recipe.retool.dev.miniature")] == [
        "core", "sandbox", "perf", "cloud", "dev"]


def test_no_module_imports_a_higher_layer():
    upward = sorted((a, b) for a, targets in graph().items() for b in targets
                    if LAYERS[layer(b)] > LAYERS[layer(a)])
    assert not upward, upward


def test_the_import_graph_has_no_circle():
    edges = graph()
    assert "recipe.retool.stages" in edges["recipe.retool.train"]  # the scan sees imports
    assert cycle(edges) is None, cycle(edges)


def test_the_checks_would_catch_a_circle_and_an_upward_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert LAYERS[layer("recipe.retool.dev.tokenizer")] > LAYERS[layer("recipe.retool.pipeline")]
