"""A warm sandbox worker: confines itself once, then forks one confined child per request.

Started by the pool as ``python -m recipe.retool.sandbox.worker CONFIG_JSON`` with a scrubbed
environment; speaks length-prefixed JSON on its stdin/stdout (4-byte big-endian length + body).

Start-up: import the preload modules (sympy, numpy, …) → enter new namespaces → fork pid 1 of the
new pid namespace, which sets up mounts and serves requests; the outer process only waits.
Per request: fresh work dir → fork → child drops privileges, applies rlimits and runs the code
as ``__main__`` in the already-warm interpreter → parent collects capped output under a wall-clock
deadline → every process left in the namespace is killed → work dir and shared tmpfs wiped.
"""

from __future__ import annotations

import base64
import builtins
import gc
import importlib
import io
import json
import os
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from typing import Any

from recipe.retool.sandbox import isolation
from recipe.retool.sandbox.isolation import Capabilities, Limits

_LEN = struct.Struct(">I")
TRUNCATION_MARKER = "\n[... output truncated: {omitted} more bytes ...]"


# ----------------------------------------------------------------------------------------------
# framing
# ----------------------------------------------------------------------------------------------


def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd: int) -> dict[str, Any]:
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size))
    return json.loads(_read_exact(fd, n))


def send(fd: int, msg: dict[str, Any]) -> None:
    body = json.dumps(msg).encode()
    data = _LEN.pack(len(body)) + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ----------------------------------------------------------------------------------------------
# the request child
# ----------------------------------------------------------------------------------------------


def _child_main(code: str, workdir: str, stdin_path: str, out_w: int, err_w: int, cfg: dict[str, Any],
                limits: Limits, caps: Capabilities) -> None:
    """Runs in the forked child; never returns."""
    try:
        os.setsid()
        os.chdir(workdir)
        fd_in = os.open(stdin_path, os.O_RDONLY)
        os.dup2(fd_in, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 65536)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        isolation.apply_limits(limits)
        if caps.uid_drop:
            uid = int(cfg["uid"])
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif caps.user_namespace:
            isolation.drop_all_capabilities()
        isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PWD": workdir})
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.argv = [os.path.join(workdir, "main.py")]
        sys.path[0] = workdir  # as for `python main.py`: the script's directory first
    except BaseException:
        os.write(2, f"sandbox set-up failed: {traceback.format_exc()}".encode())
        os._exit(121)
    status = 0
    try:
        program = compile(code, sys.argv[0], "exec")
        exec(program, {"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": builtins})
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code & 0xFF
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException as exc:
        # print the traceback as `python main.py` would: without this runner's own frame
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        if isinstance(exc, SyntaxError):
            tb = None
        traceback.print_exception(type(exc), exc, tb)
        status = 1
    try:
        import threading

        threading._shutdown()  # wait for non-daemon threads, as the interpreter would at exit
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = status or 120
    os._exit(status)


# ----------------------------------------------------------------------------------------------
# the worker
# ----------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, cfg: dict[str, Any], caps: Capabilities):
        self.cfg = cfg
        self.caps = caps
        self.runs = 0
        self.base_vm = isolation.current_address_space()

    def _limits(self, req: dict[str, Any]) -> Limits:
        mem_mb = req.get("memory_limit_MB")
        if mem_mb is None or mem_mb <= 0:
            mem_mb = self.cfg["default_memory_mb"]
        mem_mb = min(int(mem_mb), self.cfg["max_memory_mb"])
        timeout = float(req["run_timeout"])
        return Limits(
            # the user's budget comes on top of what the warm interpreter has already mapped
            memory_bytes=self.base_vm + mem_mb * 1024 * 1024,
            cpu_seconds=int(timeout) + 1,
            max_processes=self.cfg["max_processes"],
            max_file_bytes=self.cfg["max_file_mb"] * 1024 * 1024,
            max_open_files=self.cfg["max_open_files"],
        )

    def _workdir(self) -> str:
        root = self.cfg["work_root"]
        os.makedirs(root, mode=0o711, exist_ok=True)
        path = os.path.join(root, f"run{self.runs}")
        os.makedirs(path, mode=0o700)
        if self.caps.uid_drop:
            os.chown(path, int(self.cfg["uid"]), int(self.cfg["uid"]))
        return path

    @staticmethod
    def _safe_path(workdir: str, name: str) -> str:
        path = os.path.realpath(os.path.join(workdir, name.lstrip("/") if not name.startswith(workdir) else name))
        if not (path == workdir or path.startswith(workdir + "/")):
            raise ValueError(f"file path {name!r} leaves the work dir")
        return path

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        self.runs += 1
        workdir = self._workdir()
        try:
            return self._run(req, workdir)
        finally:
            self._sweep()
            self._wipe(workdir)

    def _run(self, req: dict[str, Any], workdir: str) -> dict[str, Any]:
        uid = int(self.cfg["uid"]) if self.caps.uid_drop else -1
        try:
            for name, content in (req.get("files") or {}).items():
                path = self._safe_path(workdir, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as fh:
                    fh.write(base64.b64decode(content) if content else b"")
                if uid >= 0:
                    os.chown(path, uid, uid)
        except (ValueError, OSError) as exc:
            return {"status": "SandboxError", "message": f"cannot write input files: {exc}"}
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w") as fh:
            fh.write(req.get("stdin") or "")
        with open(os.path.join(workdir, "main.py"), "w") as fh:
            fh.write(req["code"])
        limits = self._limits(req)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(out_r)
            os.close(err_r)
            _child_main(req["code"], workdir, stdin_path, out_w, err_w, self.cfg, limits, self.caps)
        os.close(out_w)
        os.close(err_w)
        deadline = start + float(req["run_timeout"])
        stdout, stderr, timed_out, wait_status, rusage = self._collect(pid, out_r, err_r, deadline)
        elapsed = time.perf_counter() - start
        fetched, missing = {}, []
        for name in req.get("fetch_files") or []:
            try:
                path = self._safe_path(workdir, name)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as fh:
                    fetched[name] = base64.b64encode(fh.read(self.cfg["max_fetch_bytes"])).decode()
            except (ValueError, OSError):
                missing.append(name)
        if timed_out:
            run_status, return_code = "TimeLimitExceeded", None
        elif os.WIFEXITED(wait_status):
            return_code = os.WEXITSTATUS(wait_status)
            run_status = "Finished" if return_code == 0 else "Error"
        else:
            sig = os.WTERMSIG(wait_status)
            return_code = -sig
            run_status = "TimeLimitExceeded" if sig == signal.SIGXCPU else "Error"
            stderr += f"\n[killed by signal {signal.Signals(sig).name}]" if sig in signal.Signals._value2member_map_ else ""
        message = f"files not found: {missing}" if missing else ""
        return {
            "status": "Success" if run_status == "Finished" else "Failed",
            "message": message,
            "compile_result": None,
            "run_result": {
                "status": run_status,
                "execution_time": round(elapsed, 6),
                "cpu_time": round(rusage.ru_utime + rusage.ru_stime, 6) if rusage else None,
                "return_code": return_code,
                "stdout": stdout,
                "stderr": stderr,
            },
            "executor_pod_name": None,
            "files": fetched,
        }

    def _collect(self, pid: int, out_r: int, err_r: int, deadline: float):
        cap = self.cfg["max_output_bytes"]
        bufs = {out_r: bytearray(), err_r: bytearray()}
        total = {out_r: 0, err_r: 0}
        open_fds = {out_r, err_r}
        pidfd = os.pidfd_open(pid)  # readable once the child has exited: one select() waits for both
        timed_out = False
        wait_status, rusage = 0, None
        exited_at = None
        try:
            while True:
                now = time.perf_counter()
                if exited_at is None:
                    done_pid, status, ru = os.wait4(pid, os.WNOHANG)
                    if done_pid:
                        exited_at, wait_status, rusage = now, status, ru
                # stop when the child has exited and its output is closed, or shortly after it exited
                # even if a leftover grandchild still holds the pipe open (the sweep kills it)
                if exited_at is not None and (not open_fds or now - exited_at > 0.05):
                    break
                if exited_at is None and now >= deadline:
                    timed_out = True
                    self._kill_tree(pid)
                    _, wait_status, rusage = os.wait4(pid, 0)
                    break
                watch = list(open_fds) + ([pidfd] if exited_at is None else [])
                timeout = 0.05 if exited_at is not None else deadline - now
                ready, _, _ = select.select(watch, [], [], max(timeout, 0.0))
                for fd in ready:
                    if fd == pidfd:
                        continue
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        open_fds.discard(fd)
                        continue
                    total[fd] += len(chunk)
                    room = cap - len(bufs[fd])
                    if room > 0:
                        bufs[fd] += chunk[:room]
        finally:
            os.close(pidfd)
        for fd in (out_r, err_r):
            os.close(fd)

        def text(fd: int) -> str:
            s = bufs[fd].decode("utf-8", errors="replace")
            if total[fd] > len(bufs[fd]):
                s += TRUNCATION_MARKER.format(omitted=total[fd] - len(bufs[fd]))
            return s

        return text(out_r), text(err_r), timed_out, wait_status, rusage

    @staticmethod
    def _kill_tree(pid: int) -> None:
        """Kill the run's process group now; the sweep after the run catches anything that left it."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _sweep(self) -> None:
        """Kill every process the run left behind (daemonised grandchildren included), reap them."""
        if self.caps.pid_namespace and os.getpid() == 1:
            try:
                os.kill(-1, signal.SIGKILL)  # as pid 1 of our namespace: everyone but us
            except ProcessLookupError:
                pass
        elif self.caps.uid_drop:
            uid = int(self.cfg["uid"])
            # kill(-1) with real/effective uid set to the sandbox uid reaches only its processes
            pid = os.fork()
            if pid == 0:
                try:
                    os.setresuid(uid, uid, uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.001)

    def _wipe(self, workdir: str) -> None:
        shutil.rmtree(workdir, ignore_errors=True)
        if self.caps.private_tmp:  # our own tmpfs mounts: empty them entirely
            for base in ("/dev/shm", "/tmp"):
                for name in os.listdir(base):
                    p = os.path.join(base, name)
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        try:
                            os.unlink(p)
                        except OSError:
                            pass


# Run once per worker after the imports: sympy and numpy import much of themselves lazily and fill
# caches on first use, so a forked child would otherwise pay that (≈100 ms for a first solve) every time.
WARMUP = """
import sympy as sp
x, y, n = sp.symbols('x y n')
sp.solve([x**2 + y**2 - 25, x - y - 1], [x, y]); sp.solve(x**3 - 6*x**2 + 11*x - 6, x)
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.factor(x**4 - 1); sp.expand((x + y)**5)
sp.integrate(x**2 * sp.exp(x), x); sp.diff(sp.log(x) * x, x); sp.limit(sp.sin(x) / x, x, 0)
sp.summation(n**2, (n, 1, 10)); sp.nsimplify(0.5); sp.Rational(3, 7) + sp.sqrt(2); sp.N(sp.pi, 30)
sp.factorint(360); sp.isprime(97); sp.binomial(10, 3); sp.Matrix([[1, 2], [3, 4]]).det()
sp.latex(x**2); sp.sympify('x + 1'); sp.Poly(x**2 + 1, x).all_coeffs(); sp.nsolve(x**2 - 2, x, 1)
import numpy as np
a = np.arange(10.0); np.linalg.solve(np.eye(3), np.ones(3)); np.sum(a); np.round(a.mean(), 3); str(a)
"""


def _warm_up() -> None:
    try:
        exec(compile(WARMUP, "<warmup>", "exec"), {"__name__": "__warmup__"})
    except Exception:  # a missing module just means less warm-up
        pass


def _preload(modules: list[str]) -> list[str]:
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception:  # an optional module may be missing; the worker still serves
            pass
    return loaded


def main() -> None:
    cfg = json.loads(sys.argv[1])
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    preloaded = _preload(cfg["preload"])
    if cfg.get("warmup", True):
        _warm_up()
    gc.collect()
    gc.freeze()  # keep the collector off the inherited objects: fewer copy-on-write faults per child
    caps = Capabilities()
    if cfg["isolate"]:
        isolation.enter_namespaces(caps)
    if caps.pid_namespace:
        child = os.fork()
        if child:  # the outer process: wait for pid 1 of the new namespace, mirror its exit
            os.close(proto_in)
            os.close(proto_out)
            signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGKILL))
            _, status = os.waitpid(child, 0)
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    if cfg["isolate"]:
        isolation.setup_mounts(caps, cfg["tmp_size_mb"], cfg["mask"], isolation.python_paths())
    if caps.root and cfg["isolate"]:
        caps.uid_drop = True  # done per request, in the child
    # work dirs live on the private /tmp tmpfs when we have one, else in a dir of our own
    cfg["work_root"] = "/tmp/w" if caps.private_tmp else tempfile.mkdtemp(prefix="retool-sandbox-")
    worker = Worker(cfg, caps)
    send(proto_out, {"ready": True, "pid": os.getpid(), "capabilities": caps.as_dict(), "preloaded": preloaded})
    while True:
        try:
            req = recv(proto_in)
        except EOFError:
            break
        try:
            resp = worker.handle(req)
        except Exception as exc:  # a bug here must not take the worker down silently
            resp = {"status": "SandboxError", "message": f"worker error: {type(exc).__name__}: {exc}"}
        send(proto_out, resp)
        if worker.runs >= cfg["recycle_after"]:
            break


if __name__ == "__main__":
    main()
