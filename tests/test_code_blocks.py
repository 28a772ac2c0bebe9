"""recipe.retool.code_blocks: code extraction and the notebook-style last expression."""

from __future__ import annotations

import pytest

from recipe.retool.code_blocks import extract_code, print_last_expression


@pytest.mark.parametrize("text, code", [
    ("```python\nprint(1)\n```", "print(1)"),
    ("Here:\n```py\nx = 2\nprint(x)\n```\ntrailing", "x = 2\nprint(x)"),
    ("```\nprint(3)\n```", "print(3)"),
    ("print(4)", "print(4)"),
    ("```python\nprint(5)", "print(5)"),  # unterminated fence
])
def test_extract_code(text, code):
    assert extract_code(text) == code


def run_locally(code: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<t>", "exec"), {})
    return buf.getvalue()


@pytest.mark.parametrize("code, printed", [
    ("x = 3\nx * 2", "6\n"),
    ("import math\nmath.factorial(\n  5)", "120\n"),
    ("print(1)", "1\n"),
    ("x = 1", ""),
    ("'text'", "'text'\n"),
    ("None", ""),
    ("for i in range(2):\n    i", ""),
    ("a = 1; a", ""),  # one-liners are left alone rather than mangled
])
def test_print_last_expression(code, printed):
    assert run_locally(print_last_expression(code)) == printed


def test_syntax_errors_are_left_for_the_interpreter():
    assert print_last_expression("def f(:") == "def f(:"
