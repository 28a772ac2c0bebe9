"""HTTP server speaking the SandboxFusion API: ``POST /run_code``, ``GET /v1/ping``, ``GET /health``.

    python -m recipe.retool.sandbox serve --host 127.0.0.1 --port 8080 --workers 8
    python -m recipe.retool.sandbox check      # print what isolation this machine allows, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from recipe.retool.sandbox.api import RunCodeRequest, RunCodeResponse
from recipe.retool.sandbox.pool import SandboxConfig, WorkerPool

logger = logging.getLogger(__name__)

SUPPORTED_LANGUAGES = {"python", "python3"}


def create_app(config: SandboxConfig | None = None) -> FastAPI:
    config = config or SandboxConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = WorkerPool(config)
        await pool.start()
        app.state.pool = pool
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="ReTool sandbox (SandboxFusion-compatible)", lifespan=lifespan)

    @app.post("/run_code", response_model=RunCodeResponse, response_model_exclude_none=False)
    async def run_code(req: RunCodeRequest) -> Any:
        if req.language.lower() not in SUPPORTED_LANGUAGES:
            return RunCodeResponse(status="SandboxError", message=f"language '{req.language}' is not supported; "
                                   f"supported: {sorted(SUPPORTED_LANGUAGES)}")
        resp = await app.state.pool.run(req.model_dump())
        return JSONResponse(resp)

    @app.get("/v1/ping")
    async def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pool: WorkerPool = app.state.pool
        return {"status": "ok", "workers": config.workers, "capabilities": pool.capabilities,
                "preloaded": pool.preloaded, "stats": dict(pool.stats)}

    return app


def _config_from_args(args: argparse.Namespace) -> SandboxConfig:
    cfg = SandboxConfig()
    for f in fields(SandboxConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    if args.preload is not None:
        cfg.preload = [m for m in args.preload.split(",") if m]
    return cfg


def _add_config_args(p: argparse.ArgumentParser) -> None:
    d = SandboxConfig()
    p.add_argument("--workers", type=int, help=f"warm worker processes = max concurrent runs (default {d.workers})")
    p.add_argument("--default-memory-mb", type=int, help=f"memory limit when a request sends none ({d.default_memory_mb})")
    p.add_argument("--max-memory-mb", type=int, help=f"cap on a request's memory_limit_MB ({d.max_memory_mb})")
    p.add_argument("--max-run-timeout", type=float, help=f"cap on a request's run_timeout ({d.max_run_timeout:g}s)")
    p.add_argument("--max-processes", type=int, help=f"RLIMIT_NPROC per run ({d.max_processes})")
    p.add_argument("--max-output-bytes", type=int, help=f"stdout/stderr kept per stream ({d.max_output_bytes})")
    p.add_argument("--tmp-size-mb", type=int, help=f"private /tmp size per worker ({d.tmp_size_mb})")
    p.add_argument("--recycle-after", type=int, help=f"requests before a worker is replaced ({d.recycle_after})")
    p.add_argument("--preload", default=None, help="comma-separated modules imported once per worker")
    p.add_argument("--allow-unsafe", action="store_true", default=None,
                   help="serve even if namespaces/uid drop are unavailable (logged loudly)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.sandbox", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--log-level", default="info")
    _add_config_args(s)
    c = sub.add_parser("check", help="start one worker, print its isolation report as JSON, exit non-zero if unsafe")
    _add_config_args(c)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config_from_args(args)
    if args.cmd == "check":
        config.workers = 1
        config.allow_unsafe = True

        async def probe() -> dict[str, Any]:
            pool = WorkerPool(config)
            await pool.start()
            try:
                res = await pool.run({"code": "print(1 + 1)", "run_timeout": 10})
                return {"capabilities": pool.capabilities, "missing": pool._missing(pool.capabilities),
                        "preloaded": pool.preloaded, "smoke_run": res}
            finally:
                await pool.close()

        report = asyncio.run(probe())
        print(json.dumps(report, indent=2))
        return 1 if report["missing"] else 0
    import uvicorn

    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, timeout_keep_alive=75)
    return 0
