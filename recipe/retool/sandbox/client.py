"""Async client for any SandboxFusion-compatible ``/run_code`` server (ours or upstream).

One implementation serves the RL tool and the evaluation harness: a concurrency limit, retries
with exponential backoff on connection errors, read time-outs and 5xx answers, and a
``CodeResult`` that never raises for a failing sandbox (a rollout worker must not crash).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)


@dataclass
class CodeResult:
    """Outcome of one code run, as the model and the metrics see it."""

    status: str  # Success | Failed | SandboxError | ClientError
    stdout: str = ""
    stderr: str = ""
    return_code: int | None = None
    timed_out: bool = False
    message: str = ""
    latency_s: float = 0.0
    attempts: int = 1
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "Success"

    @property
    def sandbox_error(self) -> bool:
        return self.status in ("SandboxError", "ClientError")

    def as_tool_text(self, max_chars: int = 4096, timeout_s: float | None = None) -> str:
        """What the model reads back: stdout, then stderr, with clear notes for time-outs and failures."""
        if self.sandbox_error:
            return f"Sandbox error: {self.message or 'the code could not be run'}"
        parts = []
        if self.stdout:
            parts.append(self.stdout)
        if self.stderr:
            parts.append(self.stderr if not parts else f"[stderr]\n{self.stderr}")
        if self.timed_out:
            limit = f" after {timeout_s:g}s" if timeout_s else ""
            parts.append(f"Execution timed out{limit}.")
        elif not parts:
            parts.append("(no output; use print() to see values)")
        text = "\n".join(p.rstrip("\n") for p in parts)
        if len(text) > max_chars:
            half = max_chars // 2
            text = f"{text[:half]}\n...[{len(text) - max_chars} characters truncated]...\n{text[-half:]}"
        return text


class SandboxClient:
    def __init__(
        self,
        base_url: str,
        max_concurrency: int = 64,
        request_timeout: float = 60.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        token: str | None = None,
    ):
        """``token``: sent as ``Authorization: Bearer`` (a server with ``RETOOL_SANDBOX_TOKEN`` set wants it)."""
        self.base_url = base_url.rstrip("/").removesuffix("/run_code")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self._max_concurrency = max_concurrency
        self._per_loop: dict[int, tuple[aiohttp.ClientSession, asyncio.Semaphore]] = {}

    def _state(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        # asyncio objects belong to one event loop; keep a connection pool and limit per loop.
        # (aiohttp rather than httpx: httpcore's pool gets quadratic with hundreds of queued requests)
        loop_id = id(asyncio.get_running_loop())
        state = self._per_loop.get(loop_id)
        if state is None or state[0].closed:
            n = self._max_concurrency
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=n), timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                headers=self._headers)
            state = (session, asyncio.Semaphore(n))
            self._per_loop[loop_id] = state
        return state

    async def run_code(
        self, code: str, language: str = "python", run_timeout: float = 10.0,
        memory_limit_mb: int | None = None, stdin: str | None = None, **extra: Any,
    ) -> CodeResult:
        payload: dict[str, Any] = {"code": code, "language": language, "run_timeout": run_timeout, **extra}
        if memory_limit_mb is not None:
            payload["memory_limit_MB"] = memory_limit_mb
        if stdin is not None:
            payload["stdin"] = stdin
        start = time.perf_counter()
        last_error = ""
        async with self._state()[1]:
            for attempt in range(1, self.max_retries + 2):
                try:
                    async with self._state()[0].post(self.base_url + "/run_code", json=payload) as resp:
                        if resp.status < 500:
                            if resp.status >= 400:
                                text = await resp.text()
                                return CodeResult("ClientError", message=f"HTTP {resp.status}: {text[:500]}",
                                                  latency_s=time.perf_counter() - start, attempts=attempt)
                            body = await resp.json(content_type=None)
                            return self._parse(body, time.perf_counter() - start, attempt)
                        last_error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:  # connect/read errors, bad JSON
                    last_error = f"{type(exc).__name__}: {exc}"
                if attempt <= self.max_retries:
                    delay = self.retry_backoff * 2 ** (attempt - 1) * (0.5 + random.random())
                    logger.debug("sandbox attempt %d failed (%s); retrying in %.2fs", attempt, last_error, delay)
                    await asyncio.sleep(delay)
        return CodeResult("SandboxError", message=f"gave up after {self.max_retries + 1} attempts: {last_error}",
                          latency_s=time.perf_counter() - start, attempts=self.max_retries + 1)

    @staticmethod
    def _parse(body: dict[str, Any], latency: float, attempts: int) -> CodeResult:
        run = body.get("run_result") or {}
        return CodeResult(
            status=body.get("status", "SandboxError"),
            stdout=run.get("stdout") or "",
            stderr=run.get("stderr") or "",
            return_code=run.get("return_code"),
            timed_out=run.get("status") == "TimeLimitExceeded",
            message=body.get("message") or "",
            latency_s=latency,
            attempts=attempts,
            raw=body,
        )

    async def ping(self) -> bool:
        try:
            async with self._state()[0].get(self.base_url + "/v1/ping", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def aclose(self) -> None:
        loop_id = id(asyncio.get_running_loop())
        state = self._per_loop.pop(loop_id, None)
        if state is not None:
            await state[0].close()
