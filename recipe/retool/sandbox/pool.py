"""The asyncio pool of warm sandbox workers that the HTTP server dispatches to."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import struct
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")

DEFAULT_PRELOAD = [
    "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "heapq", "bisect",
    "random", "statistics", "re", "json", "string", "numbers", "operator", "typing", "dataclasses",
    "numpy", "sympy", "mpmath", "scipy", "scipy.optimize", "scipy.special", "networkx",
]


@dataclass
class SandboxConfig:
    workers: int = max(4, 2 * (os.cpu_count() or 1))
    preload: list[str] = field(default_factory=lambda: list(DEFAULT_PRELOAD))
    default_memory_mb: int = 1024  # when a request sends no (or a non-positive) memory_limit_MB
    max_memory_mb: int = 8192
    max_run_timeout: float = 300.0
    max_processes: int = 64
    max_file_mb: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 256 * 1024  # per stream; the rest is counted and replaced by a marker
    max_fetch_bytes: int = 16 * 1024 * 1024
    tmp_size_mb: int = 256
    warmup: bool = True  # exercise sympy/numpy once per worker so children inherit warm caches
    recycle_after: int = 5000  # requests before a worker is replaced (bounds any slow leak)
    isolate: bool = True
    allow_unsafe: bool = False
    uid_base: int = 200_000  # worker i's children run as uid_base + i (root only)
    mask: list[str] = field(default_factory=lambda: ["/root", "/home", os.getcwd()])
    spawn_timeout: float = 120.0
    grace_s: float = 10.0  # beyond run_timeout before a silent worker is declared dead

    def worker_env(self) -> dict[str, str]:
        """The only environment workers (and so the code they run) ever see: no secrets."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
        }
        if os.environ.get("PYTHONPATH"):  # where our package lives when it is not installed
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env


class WorkerDied(RuntimeError):
    pass


class _Worker:
    def __init__(self, slot: int, proc: asyncio.subprocess.Process, info: dict[str, Any]):
        self.slot = slot
        self.proc = proc
        self.info = info
        self.runs = 0

    async def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        body = json.dumps(msg).encode()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(_LEN.pack(len(body)) + body)
            await self.proc.stdin.drain()
            header = await asyncio.wait_for(self.proc.stdout.readexactly(_LEN.size), timeout)
            (n,) = _LEN.unpack(header)
            data = await asyncio.wait_for(self.proc.stdout.readexactly(n), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as exc:
            raise WorkerDied(f"worker {self.slot} died: {type(exc).__name__}") from exc
        except asyncio.TimeoutError as exc:
            raise WorkerDied(f"worker {self.slot} did not answer within {timeout:.0f}s") from exc
        self.runs += 1
        return json.loads(data)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class WorkerPool:
    def __init__(self, config: SandboxConfig):
        self.config = config
        # idle workers and FIFO waiters: a freed worker goes to the oldest waiter, so no request
        # can be overtaken indefinitely (asyncio.Queue lets newcomers jump woken waiters)
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._workers: dict[int, _Worker] = {}
        self._replacing: set[asyncio.Task] = set()
        self.capabilities: dict[str, Any] = {}
        self.preloaded: list[str] = []
        self.stats: Counter[str] = Counter()
        self.started_at = time.time()

    async def start(self) -> None:
        workers = await asyncio.gather(*(self._spawn(i) for i in range(self.config.workers)))
        first = workers[0].info
        self.capabilities = first["capabilities"]
        self.preloaded = first["preloaded"]
        missing = self._missing(self.capabilities)
        if missing:
            text = "; ".join(missing)
            if not self.config.allow_unsafe:
                for w in workers:
                    w.kill()
                raise RuntimeError(f"refusing to serve: sandbox isolation incomplete: {text}. "
                                   f"Errors: {self.capabilities.get('errors')}. Pass --allow-unsafe to serve anyway.")
            logger.warning("SANDBOX RUNNING UNSAFE (--allow-unsafe): %s", text)
        logger.info("sandbox workers ready: %d, isolation %s, preloaded %s", len(workers),
                    {k: v for k, v in self.capabilities.items() if v and k != "errors"}, self.preloaded)
        for w in workers:
            self._workers[w.slot] = w
            self._release(w)

    async def _acquire(self) -> _Worker:
        if self._idle and not self._waiters:
            return self._idle.popleft()
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a worker just as we were cancelled
                self._release(fut.result())
            raise

    def _release(self, worker: _Worker) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(worker)
                return
        self._idle.append(worker)

    def _missing(self, caps: dict[str, Any]) -> list[str]:
        if not self.config.isolate:
            return ["isolation disabled by configuration"]
        from recipe.retool.sandbox.isolation import Capabilities

        known = {k: v for k, v in caps.items() if k in Capabilities.__dataclass_fields__}
        return Capabilities(**known).missing_for_safe_mode()

    async def _spawn(self, slot: int) -> _Worker:
        cfg = asdict(self.config)
        cfg.update(env=self.config.worker_env(), uid=self.config.uid_base + slot)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "recipe.retool.sandbox.worker", json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=self.config.worker_env(), start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            header = await asyncio.wait_for(proc.stdout.readexactly(_LEN.size), self.config.spawn_timeout)
            info = json.loads(await proc.stdout.readexactly(_LEN.unpack(header)[0]))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            proc.kill()
            raise RuntimeError(f"sandbox worker {slot} failed to start ({type(exc).__name__})") from exc
        return _Worker(slot, proc, info)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.pop(worker.slot, None)
        self.stats["worker_restarts"] += 1

        async def respawn() -> None:
            while True:
                try:
                    new = await self._spawn(worker.slot)
                    break
                except RuntimeError as exc:
                    logger.error("%s; retrying", exc)
                    await asyncio.sleep(1.0)
            self._workers[new.slot] = new
            self._release(new)

        task = asyncio.create_task(respawn())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request on an idle worker; the answer is always a response dict."""
        request = dict(request)
        request["run_timeout"] = min(float(request.get("run_timeout") or 10.0), self.config.max_run_timeout)
        queued = time.perf_counter()
        worker = await self._acquire()
        self.stats["queue_wait_ms_total"] += int((time.perf_counter() - queued) * 1000)
        try:
            resp = await worker.call(request, request["run_timeout"] + self.config.grace_s)
        except WorkerDied as exc:
            logger.error("%s; replacing it", exc)
            self._replace(worker)
            self.stats["SandboxError"] += 1
            return {"status": "SandboxError", "message": str(exc), "run_result": None, "compile_result": None,
                    "executor_pod_name": None, "files": {}}
        if worker.runs >= self.config.recycle_after:
            self._replace(worker)
        else:
            self._release(worker)
        self.stats[resp.get("status", "?")] += 1
        self.stats["requests"] += 1
        return resp

    async def close(self) -> None:
        for task in list(self._replacing):
            task.cancel()
        for w in self._workers.values():
            if w.proc.stdin is not None:
                w.proc.stdin.close()
            w.kill()
        for w in self._workers.values():
            try:
                await asyncio.wait_for(w.proc.wait(), 5)
            except asyncio.TimeoutError:
                pass
        self._workers.clear()
