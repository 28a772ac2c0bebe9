"""The code-interpreter tool for verl's multi-turn rollouts.

verl 0.9.1 no longer ships a ``SandboxFusionTool``; this is ours, a ``verl.tools.base_tool.BaseTool``
subclass loaded by ``class_name`` from ``config/tool_config/retool.yaml``. It takes ``code``
(markdown fences stripped; a bare last expression is printed, as in a notebook), posts it to a
SandboxFusion-compatible ``/run_code`` server, and returns stdout/stderr as the tool message.
A failing or unreachable sandbox yields a clear message, never an exception in the rollout worker.
"""

from __future__ import annotations

import logging
import os
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from recipe.retool.code_blocks import extract_code, print_last_expression
from recipe.retool.sandbox.client import SandboxClient
from recipe.retool.settings import DEFAULT_SANDBOX_URL, SANDBOX_TOKEN_ENV, SANDBOX_URL_ENV

__all__ = ["SandboxFusionTool", "extract_code", "print_last_expression"]

logger = logging.getLogger(__name__)

class SandboxFusionTool(BaseTool):
    """``code_interpreter``: run Python in the sandbox. Config keys (all optional but the URL):

    sandbox_fusion_url, sandbox_token_env, default_timeout, request_timeout, memory_limit_mb,
    max_concurrency, max_retries, retry_backoff, max_output_chars.

    ``sandbox_token_env`` names the environment variable holding the sandbox's bearer token
    (default ``RETOOL_SANDBOX_TOKEN``; unset → no header): the token itself never sits in a config.
    """

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema):
        super().__init__(config, tool_schema)
        url = config.get("sandbox_fusion_url")
        if not url:
            raise ValueError(f"SandboxFusionTool: config.sandbox_fusion_url is required: set {SANDBOX_URL_ENV} "
                             f"(e.g. {DEFAULT_SANDBOX_URL}; recipe.retool.train sets it from retool.sandbox_url)")
        self.timeout = float(config.get("default_timeout", 30))
        self.memory_limit_mb = int(config.get("memory_limit_mb", 1024))
        self.max_output_chars = int(config.get("max_output_chars", 4096))
        token_env = config.get("sandbox_token_env") or SANDBOX_TOKEN_ENV
        self.client = SandboxClient(
            url,
            token=os.environ.get(token_env) or None,
            max_concurrency=int(config.get("max_concurrency", 64)),
            request_timeout=float(config.get("request_timeout", self.timeout + 30)),
            max_retries=int(config.get("max_retries", 3)),
            retry_backoff=float(config.get("retry_backoff", 0.5)),
        )
        self._instances: dict[str, dict[str, Any]] = {}

    async def create(self, instance_id: str | None = None, **kwargs) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        self._instances[instance_id] = {"create_kwargs": kwargs.get("create_kwargs", {})}
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs) -> tuple[ToolResponse, float, dict]:
        raw = parameters.get("code") if isinstance(parameters, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            return ToolResponse(text="Error: the code_interpreter needs a non-empty string argument 'code'."), 0.0, {
                "status": "InvalidArguments", "latency_s": 0.0, "timed_out": False, "sandbox_error": False}
        code = print_last_expression(extract_code(raw))
        result = await self.client.run_code(code, run_timeout=self.timeout, memory_limit_mb=self.memory_limit_mb)
        if result.sandbox_error:
            logger.warning("sandbox error for %s: %s", instance_id, result.message)
        metrics = {
            "status": result.status,
            "latency_s": result.latency_s,
            "attempts": result.attempts,
            "timed_out": result.timed_out,
            "sandbox_error": result.sandbox_error,
            "return_code": result.return_code,
        }
        text = result.as_tool_text(self.max_output_chars, timeout_s=self.timeout)
        return ToolResponse(text=text), 0.0, metrics

    async def release(self, instance_id: str, **kwargs) -> None:
        self._instances.pop(instance_id, None)
