"""recipe.retool.tools: the code-interpreter tool against our real sandbox."""

from __future__ import annotations

import pytest

from recipe.retool.tools import SandboxFusionTool


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


async def test_tool_sends_the_sandbox_token_from_the_environment(token_server, monkeypatch):
    monkeypatch.setenv("RETOOL_TEST_SANDBOX_TOKEN", token_server.token)
    tool = make_tool(token_server.url, sandbox_token_env="RETOOL_TEST_SANDBOX_TOKEN", max_retries=0)
    resp, _, metrics = await tool.execute("i", {"code": "print(6 * 7)"})
    assert resp.text == "42" and metrics["status"] == "Success"
    await tool.client.aclose()
    monkeypatch.delenv("RETOOL_TEST_SANDBOX_TOKEN")
    tool = make_tool(token_server.url, sandbox_token_env="RETOOL_TEST_SANDBOX_TOKEN", max_retries=0)
    resp, _, metrics = await tool.execute("i", {"code": "print(6 * 7)"})
    assert "HTTP 401" in resp.text and metrics["sandbox_error"]
    await tool.client.aclose()
