"""The code a model wrote, as the interpreter should run it.

Shared by the SFT data conversion, the RL code-interpreter tool and the evaluation harness.
"""

from __future__ import annotations

import ast
import re

# a markdown fence, optionally tagged, possibly unterminated (model output is cut off at times)
_FENCE = re.compile(r"```[ \t]*(?:python3|python|py)?[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program to run: the body of the first markdown fence if there is one, else the text."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip("\n")


def print_last_expression(code: str) -> str:
    """If the program ends with a bare expression (not a call to print), print its value.

    Models often end a snippet with ``x`` or ``sp.solve(...)`` expecting notebook behaviour;
    without this the run prints nothing and the turn is wasted.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code  # let the interpreter report the error itself
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    last = tree.body[-1]
    call = last.value
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
        return code
    lines = code.splitlines()
    start, end = last.lineno - 1, last.end_lineno  # 1-based inclusive → slice
    if last.col_offset != 0 or start >= len(lines):
        return code  # e.g. `a = 1; a` on one line: leave as is
    expr = "\n".join(lines[start:end])
    return "\n".join([*lines[:start], f"_retool_value = ({expr})",
                      "if _retool_value is not None:", "    print(repr(_retool_value) if isinstance(_retool_value, str) "
                      "else _retool_value)", *lines[end:]])
