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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recipe.retool.sandbox.api import RequestLimits

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
    max_processes: int = 64  # processes and threads of one request (pids cgroup, else RLIMIT_NPROC)
    max_file_mb: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 256 * 1024  # per stream; the rest is counted and replaced by a marker
    max_fetch_bytes: int = 16 * 1024 * 1024  # all fetch_files of one response together
    max_fetch_files: int = 256
    max_files: int = 256  # input files of one request (`files`)
    max_path_depth: int = 64  # directories an input file's path goes down
    max_path_bytes: int = 1024  # an input file's path
    max_files_mb: int = 64  # all input files of one request together, decoded
    max_body_mb: int = 16  # a larger request body is answered 413
    max_header_kb: int = 64  # a request's line and headers together; past it, 431
    idle_timeout: float = 30.0  # a connection with no request in progress is closed after this long
    header_timeout: float = 10.0  # a request's headers must arrive within this long of its first byte (408)
    body_timeout: float = 60.0  # and its body within this long of its headers (408)
    max_connections: int = 0  # open connections per front (0: what the descriptor limit allows, at most 4096)
    max_queue: int = 1024  # requests waiting for a worker; beyond, 503 at once
    tmp_size_mb: int = 256  # each request's tmpfs (work dir, /tmp, /dev/shm together)
    max_inodes: int = 65536  # files and directories on that tmpfs
    warmup: bool = True  # exercise sympy/numpy once per worker so children inherit warm caches
    lean_zygote: bool = True  # code importing only the standard library forks from a second, small interpreter
    recycle_after: int = 5000  # requests before a worker is replaced (bounds any slow leak)
    isolate: bool = True
    cgroups: bool = True  # per-request memory and pids budgets (required unless allow_unsafe)
    allow_unsafe: bool = False
    uid_base: int = 200_000  # root only: a server claims the first free range of uids from here, and
    # slot i's children run as its first uid + i (isolation.claim_uids: no two servers on a host share one)
    spawn_timeout: float = 120.0
    grace_s: float = 10.0  # beyond run_timeout before a silent worker is declared dead
    kill_grace_s: float = 5.0  # after SIGKILL, before a run that will not end makes its worker unhealthy

    def request_limits(self) -> RequestLimits:
        """What the HTTP front checks of each request before it goes to a worker."""
        from recipe.retool.sandbox.api import RequestLimits

        return RequestLimits(max_files=self.max_files, max_path_depth=self.max_path_depth,
                             max_path_bytes=self.max_path_bytes, max_files_bytes=self.max_files_mb << 20,
                             max_fetch_files=self.max_fetch_files)

    def worker_env(self) -> dict[str, str]:
        """The only environment workers (and so the code they run) ever see: no secrets."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MPLBACKEND": "Agg",
        }

    def spawn_env(self) -> dict[str, str]:
        """The worker process's own environment: the above, plus where our package lives when it is
        not installed (the worker imports it before confinement; its children never see the path)."""
        env = self.worker_env()
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env


# A run every new worker must pass before it serves: the isolation as seen from inside a request.
PROBE = """
import json, os
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "seccomp": status("Seccomp"),
    "no_new_privs": status("NoNewPrivs"), "cap_eff": status("CapEff"),
    "visible": [p for p in ("/run", "/var", "/sys", "/boot", "/srv", "/mnt", "/home") if os.path.lexists(p)],
    "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "cgroup": open("/proc/self/cgroup").read()}))
"""


def probe_codes(preload: list[str]) -> list[str]:
    """The probe as each of a worker's warm interpreters runs it: the lean one (standard library
    only) and, when there is one, the full one (a preloaded third-party module named in a comment
    routes it there; see worker.stdlib_only)."""
    from recipe.retool.sandbox.worker import split_preload

    heavy = split_preload(preload)[1]
    return [PROBE] + ([PROBE + f"# the full interpreter: {heavy[0]}\n"] if heavy else [])


def slot_cgroups(plan: dict[str, Any] | None, slot: int) -> list[str]:
    """The tails of /proc/self/cgroup paths a run of ``slot`` must show: <server dir>/slot<N> per hierarchy."""
    return [f"{os.path.basename(d)}/slot{slot}" for d in (plan or {}).get("dirs", {}).values()]


def probe_failures(resp: dict[str, Any], caps: dict[str, Any], cgroups: list[str] | None = None) -> list[str]:
    """What the probe run saw that it should not have (empty when the worker is confined).
    ``cgroups``: the slot directories (``slot_cgroups``) the run must be in."""
    rr = resp.get("run_result") or {}
    try:
        seen = json.loads(rr.get("stdout") or "")
    except ValueError:
        return [f"probe did not run: {resp.get('status')}: {resp.get('message') or rr.get('stderr', '')[-300:]}"]
    exposed = caps.get("exposed") or []
    problems = []
    if seen["pid"] != 1 or seen["procs"] != [1]:
        problems.append(f"not alone in its own pid namespace (pid {seen['pid']}, sees {seen['procs'][:10]})")
    if seen["seccomp"] != "2" or seen["no_new_privs"] != "1":
        problems.append(f"seccomp {seen['seccomp']}, no_new_privs {seen['no_new_privs']}")
    if int(seen["cap_eff"], 16) != 0:
        problems.append(f"effective capabilities {seen['cap_eff']}")
    visible = [p for p in seen["visible"] if not any(e == p or e.startswith(p + "/") for e in exposed)]
    if visible:
        problems.append(f"host paths visible: {visible}")
    lines = seen["cgroup"].splitlines()
    if caps.get("cgroup") and not cgroups and "retool-sandbox-" not in seen["cgroup"]:
        problems.append("not in its slot's cgroup")
    missing = [c for c in cgroups or [] if not any(line.endswith("/" + c) for line in lines)]
    if caps.get("cgroup") and missing:
        problems.append(f"not in its slot's cgroup {missing} (sees {seen['cgroup'].strip()!r})")
    return problems


class WorkerDied(RuntimeError):
    pass


class QueueFull(RuntimeError):
    """Too many requests are already waiting for a worker."""


class Abandoned(RuntimeError):
    """The client went away before its request got a worker."""


class PoolGone(ConnectionError):
    """A front's channel to the pool closed: the server's first process is gone (answered 503)."""


class NoWorker(RuntimeError):
    """No worker is alive and replacing them keeps failing: waiting would be forever."""


class _Worker:
    def __init__(self, slot: int, proc: asyncio.subprocess.Process, info: dict[str, Any]):
        self.slot = slot
        self.proc = proc
        self.info = info
        self.runs = 0

    def _write(self, msg: dict[str, Any], body: bytes | None = None) -> None:
        """A frame of ``msg``; with ``body`` (a run's request, JSON), a second frame of it, as given."""
        assert self.proc.stdin is not None
        header = json.dumps(msg).encode()
        frames = [_LEN.pack(len(header)), header] + ([] if body is None else [_LEN.pack(len(body)), body])
        self.proc.stdin.write(b"".join(frames))

    async def _read(self) -> bytes:
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(_LEN.size)
        return await self.proc.stdout.readexactly(_LEN.unpack(header)[0])

    async def _reply(self) -> tuple[dict[str, Any], bytes]:
        meta = json.loads(await self._read())
        return meta, await self._read()

    async def call(self, msg: dict[str, Any], body: bytes, timeout: float,
                   abandoned: asyncio.Event | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one run (``msg``: op, id, run_timeout, which take precedence over the same keys in
        ``body``, the request's JSON, passed on as it is) and wait for its answer: the worker's note on
        it (``status``, ``stages_us``, ``unhealthy``) and the response's JSON, as bytes. When
        ``abandoned`` is set first, ask the worker to kill the run (its answer still comes, and keeps
        the protocol in step)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            self._write(msg, body)
            assert self.proc.stdin is not None
            await self.proc.stdin.drain()
            read = asyncio.ensure_future(self._reply())
            try:
                if abandoned is not None:
                    gone = asyncio.ensure_future(abandoned.wait())
                    await asyncio.wait({read, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    gone.cancel()
                    if not read.done() and abandoned.is_set():
                        self._write({"op": "cancel", "id": msg.get("id")})
                        await self.proc.stdin.drain()
                data = await asyncio.wait_for(read, max(deadline - loop.time(), 0.001))
            finally:
                read.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as exc:
            raise WorkerDied(f"worker {self.slot} died: {type(exc).__name__}") from exc
        except asyncio.TimeoutError as exc:
            raise WorkerDied(f"worker {self.slot} did not answer within {timeout:.0f}s") from exc
        self.runs += 1
        return data

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def sandbox_error(message: str) -> dict[str, Any]:
    return {"status": "SandboxError", "message": message, "run_result": None, "compile_result": None,
            "executor_pod_name": None, "files": {}}


def _encoded_error(message: str) -> bytes:
    return json.dumps(sandbox_error(message)).encode()


def _close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Close an exited worker's pipes now, not when it is collected (perhaps after the loop closed)."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


class WorkerPool:
    def __init__(self, config: SandboxConfig):
        self.config = config
        # idle workers and FIFO waiters: a freed worker goes to the oldest waiter, so no request
        # can be overtaken indefinitely (asyncio.Queue lets newcomers jump woken waiters)
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._workers: dict[int, _Worker] = {}
        self._replacing: set[asyncio.Task] = set()
        self._reaping: set[asyncio.Task] = set()
        self._seq = 0
        self._closed = False
        self._spawn_error: str | None = None  # the last failed replacement, until one succeeds
        self.capabilities: dict[str, Any] = {}
        self.preloaded: list[str] = []
        self.warm_rss_mb = 0  # a request's memory budget comes on top of the warm interpreter's size
        self.problems: deque[str] = deque(maxlen=20)  # recent worker failures, newest last (for /health)
        self.cgroup_plan: dict[str, Any] | None = None
        self.cgroup_error: str | None = None
        self.stats: Counter[str] = Counter()
        self.started_at = time.time()
        self.uid_base = config.uid_base  # the first uid of the range this server claimed (start)
        self._uid_locks: list[int] = []

    async def start(self) -> None:
        if self.config.isolate and os.geteuid() == 0:
            from recipe.retool.sandbox.isolation import claim_uids

            try:
                self.uid_base, self._uid_locks = claim_uids(self.config.uid_base, self.config.workers)
            except RuntimeError as exc:
                if not self.config.allow_unsafe:
                    raise
                logger.warning("%s; runs use uids from %d, which other servers may share", exc, self.uid_base)
        if self.config.isolate and self.config.cgroups:
            from recipe.retool.sandbox import cgroup

            try:
                self.cgroup_plan = cgroup.prepare().as_dict()
            except cgroup.CgroupUnavailable as exc:
                self.cgroup_error = str(exc)
        slots = list(range(self.config.workers))
        results = await asyncio.gather(*(self._checked_spawn(s) for s in slots), return_exceptions=True)
        workers = [r for r in results if isinstance(r, _Worker)]
        errors = [r for r in results if not isinstance(r, _Worker)]
        if errors:
            for w in workers:
                self._retire(w)
            if self._reaping:
                await asyncio.gather(*self._reaping, return_exceptions=True)
            self._remove_cgroups()
            self._release_uids()
            first = errors[0]
            if isinstance(first, BaseException) and not isinstance(first, Exception):
                raise first
            raise RuntimeError(str(first)) from first
        first = workers[0].info
        self.capabilities = first["capabilities"]
        self.preloaded = first["preloaded"]
        self.warm_rss_mb = first.get("warm_rss_mb", 0)
        missing = self._missing(self.capabilities)
        if missing:
            logger.warning("SANDBOX RUNNING UNSAFE (--allow-unsafe): %s", "; ".join(missing))
        logger.info("sandbox workers ready: %d, isolation %s, preloaded %s", len(workers),
                    {k: v for k, v in self.capabilities.items() if v and k not in ("errors", "exposed")}, self.preloaded)
        for w in workers:
            self._workers[w.slot] = w
            self._release(w)

    def _remove_cgroups(self) -> None:
        if self.cgroup_plan:
            from recipe.retool.sandbox import cgroup

            cgroup.remove(self.cgroup_plan)

    async def _acquire(self, abandoned: asyncio.Event | None) -> _Worker:
        if self._idle and not self._waiters:
            return self._idle.popleft()
        if len(self._waiters) >= self.config.max_queue:
            raise QueueFull(f"{len(self._waiters)} requests are already waiting for a sandbox worker "
                            f"(--max-queue {self.config.max_queue}); retry later")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            if abandoned is None:
                return await fut
            gone = asyncio.ensure_future(abandoned.wait())
            try:
                await asyncio.wait({fut, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if fut.done():
                return fut.result()
            raise Abandoned("the client went away while waiting for a worker")
        except (asyncio.CancelledError, Abandoned):
            if fut.done() and not fut.cancelled():  # handed a worker just as we gave up
                self._release(fut.result())
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
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
        missing = Capabilities(**known).missing_for_safe_mode()
        if self.cgroup_error and any(m.startswith("memory and pids cgroup") for m in missing):
            missing = [f"{m}: {self.cgroup_error}" if m.startswith("memory and pids cgroup") else m for m in missing]
        return missing

    async def _spawn(self, slot: int) -> _Worker:
        cfg = asdict(self.config)
        cfg.update(env=self.config.worker_env(), uid=self.uid_base + slot, slot=slot, cgroup=self.cgroup_plan)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "recipe.retool.sandbox.worker", json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=self.config.spawn_env(), start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            header = await asyncio.wait_for(proc.stdout.readexactly(_LEN.size), self.config.spawn_timeout)
            info = json.loads(await proc.stdout.readexactly(_LEN.unpack(header)[0]))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            proc.kill()
            raise RuntimeError(f"sandbox worker {slot} failed to start ({type(exc).__name__})") from exc
        return _Worker(slot, proc, info)

    async def _checked_spawn(self, slot: int) -> _Worker:
        """Spawn a worker and check it as the first one was: its own report, then a probe run from inside.
        Every worker, replacements included, passes this before it serves."""
        worker = await self._spawn(slot)
        caps = worker.info["capabilities"]
        problems = self._missing(caps)
        if not self.config.isolate:
            problems = problems if not self.config.allow_unsafe else []
        else:
            for code in probe_codes(self.config.preload):  # through each warm interpreter
                try:
                    self._seq += 1
                    _, body = await worker.call({"op": "run", "id": f"probe{self._seq}", "probe": True, "run_timeout": 30},
                                                json.dumps({"code": code}).encode(), 30 + self.config.grace_s)
                    resp = json.loads(body)
                except WorkerDied as exc:
                    resp = sandbox_error(str(exc))
                probe = probe_failures(resp, caps, slot_cgroups(self.cgroup_plan, slot))
                problems += [f"probe: {p}" for p in probe if f"probe: {p}" not in problems]
            worker.runs = 0
        if problems and not self.config.allow_unsafe:
            self._retire(worker)
            raise RuntimeError(f"refusing to serve: sandbox isolation incomplete in worker {slot}: "
                               f"{'; '.join(problems)}. Errors: {caps.get('errors')}. "
                               f"Pass --allow-unsafe to serve anyway.")
        if problems:
            logger.warning("worker %d serves UNSAFE (--allow-unsafe): %s", slot, "; ".join(problems))
        return worker

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker and reap it in the background (its pipes closed, no zombie left)."""
        worker.kill()

        async def reap() -> None:
            try:
                await asyncio.wait_for(worker.proc.wait(), 10)
            except asyncio.TimeoutError:
                logger.warning("worker %d did not exit after SIGKILL", worker.slot)
            _close_pipes(worker.proc)

        task = asyncio.create_task(reap())
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    def _replace(self, worker: _Worker, why: str, problem: bool = True) -> None:
        self._retire(worker)
        self._workers.pop(worker.slot, None)
        self.stats["worker_restarts"] += 1
        if problem:
            self.problems.append(f"{time.strftime('%H:%M:%S')} worker {worker.slot} replaced: {why}")
        if self._closed:
            return

        async def respawn() -> None:
            delay = 1.0
            while True:
                try:
                    new = await self._checked_spawn(worker.slot)
                    break
                except RuntimeError as exc:
                    logger.error("replacing worker %d: %s; retrying in %.0fs", worker.slot, exc, delay)
                    self.problems.append(f"{time.strftime('%H:%M:%S')} worker {worker.slot}: {exc}")
                    self._spawn_error = str(exc)
                    if not self._workers:  # nobody will serve the waiting requests: tell them now
                        while self._waiters:
                            fut = self._waiters.popleft()
                            if not fut.done():
                                fut.set_exception(NoWorker(f"no sandbox worker available: {exc}"))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self._spawn_error = None
            self._workers[new.slot] = new
            self._release(new)

        task = asyncio.create_task(respawn())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def health(self) -> dict[str, Any]:
        live = len(self._workers)
        return {"status": "ok" if live == self.config.workers else "degraded",
                "workers": self.config.workers, "live": live, "idle": len(self._idle),
                "queued": len(self._waiters), "replacing": len(self._replacing), "problems": list(self.problems)}

    def static_info(self) -> dict[str, Any]:
        """What does not change while the pool serves (a front process gets it once)."""
        return {"capabilities": self.capabilities, "preloaded": self.preloaded, "warm_rss_mb": self.warm_rss_mb,
                "cgroup": self.cgroup_plan}

    async def report(self) -> dict[str, Any]:
        """``/health``'s body: liveness, the static facts and the cumulative statistics."""
        return {**self.health(), **self.static_info(), "stats": dict(self.stats)}

    async def run(self, request: dict[str, Any], abandoned: asyncio.Event | None = None) -> dict[str, Any]:
        """Run one request on an idle worker; the answer is always a response dict.

        Raises :class:`QueueFull` when too many wait already and :class:`Abandoned` when ``abandoned``
        is set before a worker was free; once running, ``abandoned`` kills the run."""
        return json.loads(await self.run_encoded(json.dumps(request).encode(), request.get("run_timeout"), abandoned))

    async def run_encoded(self, body: bytes, run_timeout: float | None,
                          abandoned: asyncio.Event | None = None) -> bytes:
        """As :meth:`run`, with the request and the response as JSON bytes: the request (validated by
        the HTTP front) goes to the worker and the worker's answer back to the front as they are, so
        a large body is neither decoded nor encoded again in this process. ``run_timeout`` is the
        request's, clamped here to the configured maximum."""
        self._seq += 1
        timeout = min(float(run_timeout or 10.0), self.config.max_run_timeout)
        header = {"op": "run", "id": self._seq, "run_timeout": timeout}
        queued = time.perf_counter()
        if not self._workers and self._spawn_error:
            return _encoded_error(f"no sandbox worker available: {self._spawn_error}")
        try:
            worker = await self._acquire(abandoned)
        except NoWorker as exc:
            return _encoded_error(str(exc))
        self.stats["queue_wait_ms_total"] += int((time.perf_counter() - queued) * 1000)
        sent = time.perf_counter()
        try:
            meta, answer = await worker.call(header, body, timeout + self.config.grace_s, abandoned)
        except WorkerDied as exc:
            logger.error("%s; replacing it", exc)
            self._replace(worker, str(exc))
            self.stats["SandboxError"] += 1
            return _encoded_error(str(exc))
        except asyncio.CancelledError:
            self._replace(worker, "a request was cancelled mid-run")  # its protocol is out of step now
            raise
        self._count_stages(meta.get("stages_us") or {}, time.perf_counter() - sent)
        unhealthy = meta.get("unhealthy")
        if unhealthy:
            logger.error("worker %d unhealthy after a request (%s); replacing it", worker.slot, unhealthy)
            self._replace(worker, unhealthy)
        elif worker.runs >= self.config.recycle_after:
            self._replace(worker, "recycled", problem=False)
        else:
            self._release(worker)
        self.stats[meta.get("status") or "?"] += 1
        self.stats["requests"] += 1
        return answer

    def _count_stages(self, stages_us: dict[str, int], round_trip_s: float) -> None:
        """Totals (µs) of where requests spent their time, for /health: the worker's own stages
        (worker.Stages) and the round trip to the worker, which also counts the pipes and this event loop."""
        self.stats["timed_requests"] += 1
        self.stats["round_trip_us_total"] += int(round_trip_s * 1e6)
        for stage, us in stages_us.items():
            if isinstance(us, int):
                self.stats[f"stage_{stage}_us_total"] += us

    async def close(self) -> None:
        self._closed = True
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
            _close_pipes(w.proc)
        self._workers.clear()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)
        self._remove_cgroups()
        self._release_uids()

    def _release_uids(self) -> None:
        for fd in self._uid_locks:
            os.close(fd)
        self._uid_locks = []
