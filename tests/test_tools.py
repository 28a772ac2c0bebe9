"""recipe.retool.tools: code extraction, notebook-style last expression, the tool against our sandbox."""

from __future__ import annotations

import pytest

from recipe.retool.tools import SandboxFusionTool, extract_code, print_last_expression


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


def make_tool(url: str, **cfg) -> SandboxFusionTool:
    from verl.tools.schemas import OpenAIFunctionToolSchema

    from recipe.retool.data import load_code_tool_schema

    schema = OpenAIFunctionToolSchema.model_validate(load_code_tool_schema())
    return SandboxFusionTool({"sandbox_fusion_url": url, **cfg}, schema)


async def test_tool_execute_against_sandbox(sandbox_server):
    tool = make_tool(sandbox_server.url, default_timeout=2)
    iid, _ = await tool.create(create_kwargs={"ground_truth": "1"})
    resp, reward, metrics = await tool.execute(iid, {"code": "```python\nimport sympy\nsympy.isprime(97)\n```"})
    assert resp.text == "True" and reward == 0.0
    assert metrics["status"] == "Success" and not metrics["timed_out"] and metrics["latency_s"] > 0
    resp, _, metrics = await tool.execute(iid, {"code": "1/0"})
    assert "ZeroDivisionError" in resp.text and metrics["status"] == "Failed"
    resp, _, metrics = await tool.execute(iid, {"code": "while True: pass"})
    assert "timed out after 2s" in resp.text and metrics["timed_out"]
    resp, _, metrics = await tool.execute(iid, {"code": "x = 1"})
    assert "no output" in resp.text
    resp, _, metrics = await tool.execute(iid, {"not_code": 1})
    assert "needs a non-empty string argument 'code'" in resp.text and metrics["status"] == "InvalidArguments"
    await tool.release(iid)


async def test_tool_output_is_truncated_in_the_middle(sandbox_server):
    tool = make_tool(sandbox_server.url, max_output_chars=100)
    resp, _, _ = await tool.execute("i", {"code": "print('a' * 500 + 'END')"})
    assert len(resp.text) < 200 and resp.text.endswith("END") and "characters truncated" in resp.text


def test_tool_requires_a_url():
    with pytest.raises(ValueError, match="sandbox_fusion_url is required"):
        make_tool("")
