"""The HTTP app one front serves: ``POST /run_code``, ``GET /v1/ping``, ``GET /health``.

:func:`create_app` builds the FastAPI app over a pool (a :class:`~recipe.retool.sandbox.pool.WorkerPool`
of its own process, or a :class:`~recipe.retool.sandbox.fronts.RemotePool` in a front of several) and
:func:`serve_front` serves it with uvicorn on a socket bound by the server, behind the connection bounds
of ``connections.py``. The bearer token and the body limit are checked by an ASGI middleware before the
app sees a request. ``server.py`` (the command line) and ``fronts.py`` (a front process) both start it;
this module imports neither.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from recipe.retool.sandbox.api import RunCodeResponse, explain, request_model
from recipe.retool.sandbox.connections import ConnectionLimits, descriptor_budget, guarded_protocol
from recipe.retool.sandbox.pool import Abandoned, PoolGone, QueueFull, SandboxConfig, WorkerPool

logger = logging.getLogger(__name__)

SUPPORTED_LANGUAGES = {"python", "python3"}
TOKEN_ENV = "RETOOL_SANDBOX_TOKEN"
OPEN_PATHS = {"/v1/ping"}


def _json_safe(value: Any) -> Any:
    """Error details as JSON can carry them: finite numbers, valid UTF-8 (bad input is echoed escaped)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (int, bool)) or value is None:
        return value
    return _json_safe(repr(value))


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: bearer token, request body limit (413), body read before the app sees it."""

    def __init__(self, app: Any, token: str | None, max_body: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            # "<scheme> <credentials>", the scheme case-insensitive (RFC 7235: bearer, Bearer, BEARER)
            scheme, _, given = headers.get(b"authorization", b"").strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)):
                resp = _error(401, "missing or wrong bearer token (Authorization: Bearer …)",
                              {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return await _error(400, "bad Content-Length")(scope, receive, send)
        too_large = _error(413, f"request body over the server's limit of {self.max_body} bytes (--max-body-mb)")
        if declared > self.max_body:
            return await too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: waits for the client to go away

        await self.app(scope, replay, send)


def create_app(config: SandboxConfig | None = None, token: str | None = None, front: int = 0,
               pool: Any = None) -> FastAPI:
    """The HTTP app. ``pool``: where runs go, a :class:`fronts.RemotePool` in a front of several;
    by default a :class:`WorkerPool` of this process."""
    config = config or SandboxConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal pool
        pool = pool or WorkerPool(config)
        try:
            await pool.start()
        except RuntimeError as exc:
            logger.error("%s", exc)
            raise
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="ReTool sandbox (SandboxFusion-compatible)", lifespan=lifespan)
    app.add_middleware(_Guard, token=token, max_body=config.max_body_mb * 1024 * 1024)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": _json_safe(list(e.get("loc", ()))), "msg": _json_safe(e.get("msg", "")),
                   "type": _json_safe(e.get("type", ""))} for e in exc.errors()]
        return _error(422, detail)

    limits = config.request_limits()
    model = request_model(limits)
    request_schema = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/run_code", response_model=RunCodeResponse, response_model_exclude_none=False,
              openapi_extra=request_schema)
    async def run_code(request: Request) -> Any:
        # validated here rather than by FastAPI, so that the server's limits apply (validation context)
        # and the counts of files and fetch_files are checked before any of their names is
        try:
            req = model.model_validate_json(await request.body(), context=limits)
        except ValidationError as exc:
            errors = explain(exc.errors(include_input=False))
            raise RequestValidationError([{**e, "loc": ("body", *e.get("loc", ()))} for e in errors]) from None
        if req.language.lower() not in SUPPORTED_LANGUAGES:
            return RunCodeResponse(status="SandboxError", message=f"language '{req.language}' is not supported; "
                                   f"supported: {sorted(SUPPORTED_LANGUAGES)}")
        abandoned = asyncio.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            abandoned.set()

        watcher = asyncio.create_task(watch())
        try:
            # encoded once here (pydantic's serializer); the pool's process passes it to a worker as it is
            body = await app.state.pool.run_encoded(req.model_dump_json().encode(), req.run_timeout, abandoned)
        except (QueueFull, PoolGone) as exc:
            return _error(503, str(exc), {"Retry-After": "1"})
        except Abandoned:
            return Response(status_code=499)  # nobody is listening any more
        finally:
            watcher.cancel()
        return Response(body, media_type="application/json")  # the worker's JSON, not decoded here

    @app.get("/v1/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            body = {**await app.state.pool.report(), "front": front}
        except PoolGone as exc:
            return _error(503, str(exc))
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    return app


def connection_limits(config: SandboxConfig, pool_here: bool) -> ConnectionLimits:
    """A front's connection limits; the bound on open connections leaves descriptors for the rest of the
    process (the workers' pipes too, where the pool lives in it)."""
    budget = descriptor_budget(reserve=64 + (4 * config.workers if pool_here else 0))
    wanted = config.max_connections or 4096
    if wanted > budget:
        logger.warning("--max-connections %d: only %d fit this process's descriptor limit", wanted, budget)
    return ConnectionLimits(idle_timeout=config.idle_timeout, header_timeout=config.header_timeout,
                            body_timeout=config.body_timeout, max_header_bytes=config.max_header_kb << 10,
                            max_connections=min(wanted, budget))


def serve_front(sock: socket.socket, config: SandboxConfig, token: str | None, log_level: str,
                front: int = 0, pool: Any = None) -> int:
    import uvicorn

    limits = connection_limits(config, pool_here=pool is None)
    logger.info("connections: at most %d open, idle %gs, headers %gs and %d bytes, body %gs",
                limits.max_connections, limits.idle_timeout, limits.header_timeout, limits.max_header_bytes,
                limits.body_timeout)
    server = uvicorn.Server(uvicorn.Config(create_app(config, token, front, pool), log_level=log_level,
                                           access_log=False, http=guarded_protocol(limits),
                                           timeout_keep_alive=config.idle_timeout,
                                           h11_max_incomplete_event_size=limits.max_header_bytes + 4096))
    server.run(sockets=[sock])
    return 0 if server.started else 1
