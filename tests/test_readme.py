"""README.md and the guides against the code: every command they name exists and answers --help, and
the list of verl internals we patch (docs/verl_patches.md) is complete and true (CI's check of the
documentation)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {p.relative_to(REPO).as_posix(): p.read_text()
        for p in [REPO / "README.md", REPO / "recipe/retool/sandbox/README.md", *(REPO / "docs").glob("*.md"),
                  *(REPO / "scripts" / "lab").glob("*.md")]}
PATCHES = (REPO / "docs" / "verl_patches.md").read_text()


def _found(pattern: str) -> list[str]:
    return sorted({m for text in DOCS.values() for m in re.findall(pattern, text)})


MODULES = _found(r"python -m (recipe\.retool(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def test_the_readme_names_a_module_for_every_stage_and_links_existing_guides():
    for stage in ("data", "prefilter_dataset", "train", "evaluate", "sandbox", "pipeline", "dev.miniature",
                  "cloud.launcher"):
        assert f"python -m recipe.retool.{stage}" in README, stage
    links = re.findall(r"\]\(([^)#]+\.md)", README)
    assert len(links) >= 5 and not [link for link in links if not (REPO / link).is_file()], links
    assert len(README.splitlines()) <= 170  # a guide's front page; the details are in docs/


@pytest.mark.parametrize("module", MODULES)
def test_every_documented_module_command_answers_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, f"python -m {module} --help:\n{proc.stderr[-2000:]}"
    assert "usage:" in proc.stdout


def test_every_documented_script_and_wrapper_exists():
    paths = _found(r"(?<![\w/])((?:\./)?(?:recipe/retool/[\w/]+\.sh|scripts/(?:lab/)?\w+\.(?:py|sh)))")
    assert len(paths) > 10
    missing = [p for p in paths if not (REPO / p.removeprefix("./")).is_file()]
    assert not missing, missing


def test_every_documented_modal_function_exists():
    import modal
    from modal.app import LocalEntrypoint

    import recipe.retool.cloud.modal_app as app

    names = _found(r"modal_app\.py::(\w+)")
    assert {"train_sft", "train_grpo", "evaluate", "smoke", "dry_run"} <= set(names)
    assert not [n for n in names if not isinstance(getattr(app, n, None), (modal.Function, LocalEntrypoint))]


def _patch_table() -> list[dict[str, str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in PATCHES.splitlines()
            if line.startswith("| `")]
    return [{"module": r[0].strip("`"), "attribute": re.search(r"`(verl\.[\w.]+)`", r[1]).group(1), "test": r[4].strip("`")}
            for r in rows]


def test_each_listed_patch_is_real_and_tested():
    rows = _patch_table()
    assert len(rows) >= 5
    for row in rows:
        source = (REPO / row["module"]).read_text()
        module_name, _, attr = row["attribute"].rpartition(".")
        assert hasattr(importlib.import_module(module_name), attr), row["attribute"]  # still in verl 0.9.1
        assert attr in source, (row["module"], attr)
        test = REPO / row["test"]
        assert test.is_file() and Path(row["module"]).stem in test.read_text(), row


def _verl_names(tree: ast.Module) -> set[str]:
    """Names a file binds to verl modules or objects (``from verl.x import y [as z]``, ``import verl.x``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("verl"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("verl")}
    return names


def _assigned_verl_attributes(path: Path) -> set[str]:
    """Attributes of verl objects this file assigns (``mod.attr = …``, ``mod.table[k] = …``, and
    ``sys.modules[name].attr = …``)."""
    tree = ast.parse(path.read_text())
    verl = _verl_names(tree)
    found = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for target in targets:
            if isinstance(target, ast.Subscript):
                target = target.value
            if not isinstance(target, ast.Attribute):
                continue
            base = target.value
            if isinstance(base, ast.Name) and base.id in verl:
                found.add(target.attr)
            elif isinstance(base, ast.Subscript) and "sys.modules" in ast.unparse(base.value):
                found.add(target.attr)
    return found


def test_the_list_of_patched_verl_internals_is_complete():
    listed = {(row["module"], row["attribute"].rpartition(".")[2]) for row in _patch_table()}
    patched = {(path.relative_to(REPO).as_posix(), attr)
               for path in (REPO / "recipe").rglob("*.py") for attr in _assigned_verl_attributes(path)}
    assert patched, "the scan found nothing: it is broken"
    assert patched <= listed, f"verl internals patched but not listed in docs/verl_patches.md: {sorted(patched - listed)}"


def test_every_relative_link_of_the_guides_resolves():
    guides = [REPO / "README.md", REPO / "recipe/retool/sandbox/README.md", *(REPO / "docs").glob("*.md"),
              *(REPO / "scripts" / "lab").glob("*.md")]
    broken = [(g.relative_to(REPO).as_posix(), t) for g in guides for t in re.findall(r"\]\(([^)#\s]+)", g.read_text())
              if not t.startswith("http") and not (g.parent / t).exists()]
    assert not broken, broken
