"""Several HTTP fronts over one pool of workers (``serve --fronts N``, N > 1).

The server's first process owns every worker (one :class:`~recipe.retool.sandbox.pool.WorkerPool`,
one FIFO queue) and serves it to each front process over a Unix socket pair of its own. A front parses
and validates HTTP, forwards ``/run_code`` to the pool and encodes the answer; any front's request
runs on any idle worker. (When each front owned a share of the workers, the uneven spread of
keep-alive connections over the fronts left workers of one front idle while another front's requests
queued: 50–59% of the workers' capacity on a load bound by run time, against 87–88% with one pool.)

Frames on a channel: a 4-byte big-endian length and a JSON header, then a 4-byte length and a
payload (empty but for runs and responses: the request's JSON as the front encoded it, the
response's as the worker did; the pool's process passes both through untouched).

- pool → front, first: ``{"hello": {capabilities, preloaded, warm_rss_mb, cgroup}}``
- front → pool: ``{"op": "ready"}`` after the hello; ``{"op": "run", "rid": k, "run_timeout": t}`` with the request as payload;
  ``{"op": "abandon", "rid": k}`` when the client went away; ``{"op": "report", "rid": k}`` for ``/health``
- pool → front: ``{"rid": k, "response": true}`` with the response as payload, ``{"rid": k, "report": {...}}``, or
  ``{"rid": k, "error": "queue_full" | "abandoned" | "failed", "message": "..."}``

A front whose channel closes (the pool's process died) shuts itself down, so no front outlives the
pool while holding the port. The front process is started by the server (``_supervise`` in
``server.py``), not by hand; it serves the HTTP app of ``app.py``. Imports go one way: ``server``
imports this module, this module imports ``app``, and neither of those imports ``server``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from recipe.retool.sandbox.app import TOKEN_ENV, serve_front
from recipe.retool.sandbox.pool import Abandoned, PoolGone, QueueFull, SandboxConfig, WorkerPool, sandbox_error

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")


def _frame(msg: dict[str, Any], payload: bytes = b"") -> bytes:
    header = json.dumps(msg).encode()
    return b"".join((_LEN.pack(len(header)), header, _LEN.pack(len(payload)), payload))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    async def part() -> bytes:
        return await reader.readexactly(_LEN.unpack(await reader.readexactly(_LEN.size))[0])

    msg = json.loads(await part())
    return msg, await part()


async def _open(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # the default 64 KiB buffer limit only bounds readline(); readexactly() takes whole frames
    return await asyncio.open_unix_connection(sock=sock, limit=2**20)


class PoolService:
    """The pool's side: answers each front's channel, counts the requests each front brought."""

    def __init__(self, pool: WorkerPool, fronts: int):
        self.pool = pool
        self.requests_by_front = [0] * fronts

    async def report(self) -> dict[str, Any]:
        return {**await self.pool.report(), "requests_by_front": list(self.requests_by_front)}

    async def serve(self, index: int, sock: socket.socket, ready: asyncio.Event) -> None:
        """Answer front ``index`` until its channel closes; then its requests count as abandoned
        (waiting ones leave the queue, running ones are killed)."""
        reader, writer = await _open(sock)
        pending: dict[int, asyncio.Event] = {}
        tasks: set[asyncio.Task] = set()

        async def send(msg: dict[str, Any], payload: bytes = b"") -> None:
            if writer.is_closing():
                return
            writer.write(_frame(msg, payload))
            try:
                await writer.drain()
            except ConnectionError:
                pass

        async def run(rid: int, request: bytes, run_timeout: float | None, abandoned: asyncio.Event) -> None:
            body = b""
            try:
                body = await self.pool.run_encoded(request, run_timeout, abandoned)
                out = {"rid": rid, "response": True}
                self.requests_by_front[index] += 1
            except QueueFull as exc:
                out = {"rid": rid, "error": "queue_full", "message": str(exc)}
            except Abandoned as exc:
                out = {"rid": rid, "error": "abandoned", "message": str(exc)}
            except Exception as exc:  # a bug must answer the front, not leave its request hanging
                logger.exception("request from front %d failed", index)
                out = {"rid": rid, "error": "failed", "message": f"{type(exc).__name__}: {exc}"}
            finally:
                pending.pop(rid, None)
            await send(out, body)

        async def report(rid: int) -> None:
            await send({"rid": rid, "report": await self.report()})

        def spawn(coro: Any) -> None:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await send({"hello": self.pool.static_info()})
        try:
            while True:
                msg, payload = await _read_frame(reader)
                op, rid = msg.get("op"), msg.get("rid")
                if op == "run":
                    pending[rid] = asyncio.Event()
                    spawn(run(rid, payload, msg.get("run_timeout"), pending[rid]))
                elif op == "abandon":
                    if rid in pending:
                        pending[rid].set()
                elif op == "report":
                    spawn(report(rid))
                elif op == "ready":
                    ready.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:  # a front that speaks nonsense is dropped (it stops, and is restarted)
            logger.error("front %d sent a malformed frame (%s: %s); closing its channel", index, type(exc).__name__, exc)
        finally:
            for event in pending.values():
                event.set()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()


class RemotePool:
    """The front's side: the parts of :class:`WorkerPool` the HTTP app uses, over the channel."""

    def __init__(self, sock: socket.socket, on_lost: Callable[[], None] | None = None):
        self._sock = sock
        self._on_lost = on_lost
        self._pending: dict[int, asyncio.Future] = {}
        self._rid = 0
        self._gone = False
        self.capabilities: dict[str, Any] = {}
        self.preloaded: list[str] = []
        self.warm_rss_mb = 0
        self.cgroup_plan: dict[str, Any] | None = None

    async def start(self) -> None:
        self._reader, self._writer = await _open(self._sock)
        hello = (await _read_frame(self._reader))[0]["hello"]
        self.capabilities, self.preloaded = hello["capabilities"], hello["preloaded"]
        self.warm_rss_mb, self.cgroup_plan = hello["warm_rss_mb"], hello["cgroup"]
        self._reading = asyncio.create_task(self._read_loop())
        await self._send({"op": "ready"})  # the app serves once its start-up (this) is done

    async def _read_loop(self) -> None:
        try:
            while True:
                msg, payload = await _read_frame(self._reader)
                fut = self._pending.pop(msg.get("rid"), None)
                if fut is not None and not fut.done():
                    fut.set_result((msg, payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:  # a bug here must not leave requests waiting forever
            logger.exception("reading from the worker pool failed")
        self._gone = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PoolGone("the sandbox's worker pool is gone"))
        self._pending.clear()
        if self._on_lost is not None:
            self._on_lost()

    async def _send(self, msg: dict[str, Any]) -> None:
        if self._gone:
            raise PoolGone("the sandbox's worker pool is gone")
        self._writer.write(_frame(msg))
        await self._drain()

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise PoolGone(f"the sandbox's worker pool is gone ({type(exc).__name__})") from exc

    def _request(self, msg: dict[str, Any], payload: bytes = b"") -> tuple[int, asyncio.Future]:
        """Register a request (its answer resolves the future) and queue its frame."""
        if self._gone:
            raise PoolGone("the sandbox's worker pool is gone")
        self._rid += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._rid] = fut
        self._writer.write(_frame({**msg, "rid": self._rid}, payload))
        return self._rid, fut

    async def report(self) -> dict[str, Any]:
        _, fut = self._request({"op": "report"})
        await self._drain()
        return (await fut)[0]["report"]

    async def run(self, request: dict[str, Any], abandoned: asyncio.Event | None = None) -> dict[str, Any]:
        return json.loads(await self.run_encoded(json.dumps(request).encode(), request.get("run_timeout"), abandoned))

    async def run_encoded(self, body: bytes, run_timeout: float | None,
                          abandoned: asyncio.Event | None = None) -> bytes:
        """As :meth:`WorkerPool.run_encoded`: the request's JSON in, the response's out;
        :class:`QueueFull` or :class:`Abandoned`, and :class:`PoolGone` when the pool's process is gone."""
        rid, fut = self._request({"op": "run", "run_timeout": run_timeout}, body)
        try:
            await self._drain()
            if abandoned is not None:
                gone = asyncio.ensure_future(abandoned.wait())
                try:
                    await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                if not fut.done():
                    await self._send({"op": "abandon", "rid": rid})
            msg, payload = await fut
        except asyncio.CancelledError:
            self._pending.pop(rid, None)
            if not self._gone:
                self._writer.write(_frame({"op": "abandon", "rid": rid}))  # its run is killed, or it leaves the queue
            raise
        if msg.get("response"):
            return payload
        if msg["error"] == "queue_full":
            raise QueueFull(msg["message"])
        if msg["error"] == "abandoned":
            raise Abandoned(msg["message"])
        return json.dumps(sandbox_error(f"the worker pool failed on this request: {msg['message']}")).encode()

    async def close(self) -> None:
        if hasattr(self, "_writer"):
            self._writer.close()


def front_command(listen_fd: int, channel_fd: int, index: int, config: SandboxConfig, log_level: str) -> list[str]:
    """How the server starts front ``index`` on the inherited listening socket and channel."""
    return [sys.executable, "-m", "recipe.retool.sandbox.fronts", str(listen_fd), str(channel_fd), str(index),
            json.dumps(asdict(config)), log_level]


def main(argv: list[str]) -> int:
    listen_fd, channel_fd, index = (int(a) for a in argv[:3])
    config = SandboxConfig(**json.loads(argv[3]))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s front {index} %(name)s: %(message)s")
    listen = socket.socket(fileno=listen_fd)
    channel = socket.socket(fileno=channel_fd)
    token = os.environ.get(TOKEN_ENV) or None

    def lost() -> None:
        logger.error("the channel to the worker pool closed; this front stops")
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful exit

    return serve_front(listen, config, token, argv[4], front=index, pool=RemotePool(channel, on_lost=lost))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
