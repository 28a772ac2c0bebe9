"""One owner per cross-cutting setting: each environment variable's name and default is written once
in code (recipe/retool/settings.py, or the sandbox's own module for its token), and the GPU configs
read the sandbox URL's default from one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from recipe.retool import PACKAGE_DIR, settings

OWNERS = {PACKAGE_DIR / "settings.py", PACKAGE_DIR / "sandbox" / "app.py"}
VALUES = {"RETOOL_SANDBOX_URL", "RETOOL_SANDBOX_TOKEN", settings.DEFAULT_SANDBOX_URL, settings.DEFAULT_MODEL_URL}


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings}


def test_each_name_and_default_is_written_once_in_the_code():
    copies = {str(path.relative_to(PACKAGE_DIR)): sorted(VALUES & _literals(path))
              for path in PACKAGE_DIR.rglob("*.py") if path not in OWNERS}
    assert not {k: v for k, v in copies.items() if v}, "write these through recipe.retool.settings"


def test_the_configs_hold_the_sandbox_urls_default_once():
    lines = [(path.name, line) for path in PACKAGE_DIR.rglob("*.yaml") for line in path.read_text().splitlines()
             if not line.lstrip().startswith("#") and re.search(r"localhost:\d+|RETOOL_SANDBOX_TOKEN", line)]
    assert lines == [("retool_grpo_template.yaml", f"  sandbox_url: ${{oc.env:RETOOL_SANDBOX_URL,{settings.DEFAULT_SANDBOX_URL}}}")]
    wrappers = "".join(p.read_text() for p in PACKAGE_DIR.glob("*.sh"))
    assert not re.search(r"localhost:\d+", "\n".join(x for x in wrappers.splitlines() if not x.startswith("#")))
