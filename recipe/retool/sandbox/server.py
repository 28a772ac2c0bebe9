"""HTTP server speaking the SandboxFusion API: ``POST /run_code``, ``GET /v1/ping``, ``GET /health``.

    python -m recipe.retool.sandbox serve --host 127.0.0.1 --port 8080 --workers 8 [--fronts 2]
    python -m recipe.retool.sandbox check      # print what isolation this machine allows, then exit

The listening socket is bound before anything else, so a busy port fails at once. ``--fronts N``
runs N HTTP front processes on that one socket (the kernel hands each new connection to one of
them): one Python process that parses, validates and encodes every request would be the ceiling on
a many-core host. The workers stay one pool with one queue, owned by the server's first process,
which the fronts reach over Unix socket pairs (``fronts.py``): a request from any front runs on any
idle worker, however unevenly the connections spread over the fronts.

Access: with ``RETOOL_SANDBOX_TOKEN`` set in the server's environment every endpoint but
``/v1/ping`` needs ``Authorization: Bearer <token>`` (the scheme in any case, as RFC 7235 has it;
``--require-token`` refuses to start without one: a public deployment must). Without it the server stays open to clients that send no header
(verl's helper, the official client), which is meant for loopback use.

Connections (``connections.py``): idle ones are closed after ``--idle-timeout``, requests whose headers
or body come too slowly answered 408, headers past ``--max-header-kb`` 431, and a front holds at most
``--max-connections``, shedding the oldest idle ones first; all before the token is checked.

Limits: a body over ``--max-body-mb`` is answered 413, more than ``--max-queue`` waiting requests
503, a malformed request 422 with a message, as are input files past ``--max-files``,
``--max-path-depth``, ``--max-path-bytes`` or ``--max-files-mb`` (the message names the limit); a
request whose client disconnects is dropped from the queue, or its run killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import fields
from typing import Any

from recipe.retool.sandbox import isolation
from recipe.retool.sandbox.app import TOKEN_ENV, serve_front
from recipe.retool.sandbox.app import create_app as create_app  # re-exported: the ASGI app (the Modal endpoint)
from recipe.retool.sandbox.fronts import PoolService, front_command
from recipe.retool.sandbox.pool import SandboxConfig, WorkerPool

logger = logging.getLogger(__name__)


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
    p.add_argument("--default-memory-mb", type=int, help=f"memory budget when a request sends none ({d.default_memory_mb})")
    p.add_argument("--max-memory-mb", type=int, help=f"cap on a request's memory_limit_MB ({d.max_memory_mb})")
    p.add_argument("--max-run-timeout", type=float, help=f"cap on a request's run_timeout ({d.max_run_timeout:g}s)")
    p.add_argument("--max-processes", type=int, help=f"processes and threads per run ({d.max_processes})")
    p.add_argument("--max-output-bytes", type=int, help=f"stdout/stderr kept per stream ({d.max_output_bytes})")
    p.add_argument("--max-fetch-bytes", type=int, help=f"all fetch_files of a response together ({d.max_fetch_bytes})")
    p.add_argument("--max-body-mb", type=int, help=f"request body limit, else 413 ({d.max_body_mb})")
    p.add_argument("--max-header-kb", type=int, help=f"request line and headers together, else 431 ({d.max_header_kb})")
    p.add_argument("--idle-timeout", type=float, help=f"close a connection idle this long ({d.idle_timeout:g}s)")
    p.add_argument("--header-timeout", type=float,
                   help=f"a request's headers must arrive within this long of its first byte, else 408 ({d.header_timeout:g}s)")
    p.add_argument("--body-timeout", type=float,
                   help=f"and its body within this long of its headers, else 408; an answer the client "
                   f"does not read for this long drops the connection ({d.body_timeout:g}s)")
    p.add_argument("--max-connections", type=int,
                   help="open connections per front; past it the oldest idle (else still sending) one is shed "
                        "(default: what the descriptor limit allows, at most 4096)")
    p.add_argument("--max-files", type=int, help=f"input files of a request, else 422 ({d.max_files})")
    p.add_argument("--max-path-depth", type=int, help=f"directories an input file's path goes down ({d.max_path_depth})")
    p.add_argument("--max-path-bytes", type=int, help=f"an input file's path, in bytes ({d.max_path_bytes})")
    p.add_argument("--max-files-mb", type=int, help=f"all input files of a request together ({d.max_files_mb})")
    p.add_argument("--max-fetch-files", type=int, help=f"names in a request's fetch_files ({d.max_fetch_files})")
    p.add_argument("--max-queue", type=int, help=f"requests waiting for a worker, else 503 ({d.max_queue})")
    p.add_argument("--tmp-size-mb", type=int, help=f"each request's tmpfs: work dir, /tmp, /dev/shm ({d.tmp_size_mb})")
    p.add_argument("--recycle-after", type=int, help=f"requests before a worker is replaced ({d.recycle_after})")
    p.add_argument("--preload", default=None, help="comma-separated modules imported once per worker")
    p.add_argument("--no-lean-zygote", dest="lean_zygote", action="store_false", default=None,
                   help="run all code in the zygote with every preload module (default: code that imports only "
                        "the standard library runs in a smaller one, which forks faster)")
    p.add_argument("--allow-unsafe", action="store_true", default=None,
                   help="serve even if an isolation mechanism is unavailable (logged loudly)")


def default_fronts() -> int:
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts (so a busy port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    return sock  # not inheritable: only the fronts get it (pass_fds), never a worker


def _supervise(sock: socket.socket, config: SandboxConfig, log_level: str, fronts: int) -> int:
    """Own the worker pool, start ``fronts`` front processes on the socket and serve them the pool;
    restart a front that dies after it was ready. SIGTERM (or SIGINT) stops: no new connections, the
    requests in flight finish (as long as their runs take); a second signal ends them at once.

    On uvloop where it is installed (as uvicorn runs the fronts): against asyncio's own loop it took
    0.5–0.8 ms off a request at concurrency 1 on 2 cores. Its spawn ignores ``close_fds``, so no
    descriptor here is made inheritable (the fronts get theirs through ``pass_fds``) and each worker
    closes whatever else it inherited as it starts."""
    async def supervise() -> int:
        stopping, forced = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            if stopping.is_set():
                forced.set()
            stopping.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        pool = WorkerPool(config)
        try:
            await pool.start()  # a signal meanwhile is acted on once it is up: nothing is left half-started
        except RuntimeError as exc:
            logger.error("%s", exc)
            return 1
        if stopping.is_set():
            await pool.close()
            return 0
        service = PoolService(pool, fronts)
        procs: dict[int, asyncio.subprocess.Process] = {}
        ready = [asyncio.Event() for _ in range(fronts)]
        failed = False

        async def front(i: int) -> None:
            nonlocal failed
            while not stopping.is_set():
                ours, theirs = socket.socketpair()
                ready[i].clear()
                try:
                    procs[i] = await asyncio.create_subprocess_exec(
                        *front_command(sock.fileno(), theirs.fileno(), i, config, log_level),
                        pass_fds=(sock.fileno(), theirs.fileno()))
                except OSError as exc:
                    logger.error("cannot start front %d: %s; stopping", i, exc)
                    ours.close()
                    failed = True
                    stopping.set()
                    return
                finally:
                    theirs.close()
                if stopping.is_set():
                    procs[i].terminate()  # the stop came while it was being started
                serving = asyncio.create_task(service.serve(i, ours, ready[i]))
                code = await procs[i].wait()
                await asyncio.gather(serving, return_exceptions=True)
                if stopping.is_set():
                    return
                if not ready[i].is_set():
                    logger.error("front %d exited before it was ready (status %d); stopping", i, code)
                    failed = True
                    stopping.set()
                    return
                logger.error("front %d exited (status %d); restarting it", i, code)
                await asyncio.sleep(1.0)

        async def announce() -> None:
            await asyncio.gather(*(r.wait() for r in ready))
            logger.info("%d fronts ready over one pool of %d workers", fronts, config.workers)

        tasks = [asyncio.create_task(front(i)) for i in range(fronts)]
        announcing = asyncio.create_task(announce())
        await stopping.wait()
        announcing.cancel()
        sock.close()  # once the fronts close theirs, the port refuses new connections instead of queueing them
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()  # uvicorn finishes the requests in flight, which still need the pool
        everyone = asyncio.gather(*tasks)
        drained = asyncio.ensure_future(forced.wait())
        await asyncio.wait({everyone, drained}, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        if not everyone.done():
            logger.warning("second signal: ending the requests still in flight")
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
            await everyone
        await pool.close()
        return 1 if failed else 0

    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is None or not hasattr(uvloop, "run"):  # uvloop.run: 0.18 and later
        return asyncio.run(supervise())
    return uvloop.run(supervise())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.sandbox", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--log-level", default="info")
    s.add_argument("--fronts", type=int, default=None,
                   help=f"HTTP front processes sharing the port (default {default_fronts()}: one per 4 cores)")
    s.add_argument("--require-token", action="store_true",
                   help=f"refuse to start unless {TOKEN_ENV} is set (for any server reachable beyond loopback)")
    _add_config_args(s)
    c = sub.add_parser("check", help="start one worker, print its isolation report as JSON, exit non-zero if unsafe")
    _add_config_args(c)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config_from_args(args)
    if args.cmd == "check":
        return _check(config)
    hidden = isolation.python_paths_hidden_per_run() if config.isolate else []
    if hidden:
        path, under = hidden[0]
        logger.error("the Python installation at %s lies under %s, which every sandboxed run replaces with a "
                     "fresh one of its own, so runs could not import its modules: install Python (or the "
                     "virtual environment) elsewhere", path, under)
        return 2
    token = os.environ.get(TOKEN_ENV) or None
    if args.require_token and not token:
        logger.error("--require-token: set %s in the server's environment", TOKEN_ENV)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 2
    fronts = args.fronts or min(default_fronts(), config.workers)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    logger.info("listening on %s:%d (%d front%s), auth %s", args.host, args.port, fronts, "s" * (fronts > 1),
                "bearer token" if token else "none")
    if fronts == 1:
        return serve_front(sock, config, token, args.log_level)
    return _supervise(sock, config, args.log_level, fronts)


def _check(config: SandboxConfig) -> int:
    config.workers = 1
    config.allow_unsafe = True

    async def probe() -> dict[str, Any]:
        pool = WorkerPool(config)
        await pool.start()
        try:
            res = await pool.run({"code": "print(1 + 1)", "run_timeout": 10})
            return {"capabilities": pool.capabilities, "missing": pool._missing(pool.capabilities),
                    "cgroup": pool.cgroup_plan, "preloaded": pool.preloaded, "smoke_run": res}
        finally:
            await pool.close()

    report = asyncio.run(probe())
    print(json.dumps(report, indent=2))
    sys.stdout.flush()
    return 1 if report["missing"] else 0
