"""A warm sandbox worker: confines itself once, then forks one confined child per request.

Started by the pool as ``python -m recipe.retool.sandbox.worker CONFIG_JSON`` with a scrubbed
environment; speaks length-prefixed JSON on its stdin/stdout (4-byte big-endian length + body). A
run comes as two frames: the pool's header (``op``, ``id``, ``run_timeout``) and the request as the
HTTP front encoded it; a cancel is one frame. Each answer is two frames: a note for the pool
(status, stage timings, whether this worker is still healthy) and the response for the client.

Start-up: import the standard-library preload modules → join nothing yet, but open this slot's
cgroup → enter new namespaces → fork pid 1 of the new pid namespace (the *manager*), which pivots
into the allowlisted root and forks the *lean zygote*, then imports the other preload modules
(sympy, numpy, …), exercises them and forks the *full zygote*; the outer process only waits.
A zygote never sees a request's data (code, stdin, files, output): the manager handles all of
that, and tells a zygote only "fork now, with these limits and these pipes". So nothing of one
request can be read back from memory by the next.

Two zygotes, for speed: forking an interpreter and tearing the child down costs in proportion to
the memory it maps (about 2 ms of CPU for the 80 MB one with sympy and numpy, 0.4 ms for a bare
one, on the development machine). Code whose imports are all in the standard library (and that
names no heavy preload module) runs in the lean zygote's child; any other code in the full one's.
A wrong guess costs only time: a module the lean child lacks is imported as by ``python main.py``.

Per request (manager): a fresh tmpfs at ``/sandbox`` (the work dir ``/sandbox/work``, the
request's ``/tmp`` and ``/dev/shm``, its stdin), input files written while no process of the
request exists yet (the time this takes counts against the request's ``run_timeout``: the run's
deadline starts when the request arrives) → the slot's cgroup limits set → the zygote forks the child into a new pid
namespace (born in the slot's cgroup, where the zygote lives) → the child takes new mount and ipc
namespaces, drops privileges, applies rlimits and the seccomp filter and runs the code as ``__main__`` in the already-warm
interpreter → the manager collects capped output under a wall-clock deadline (or kills the run when
the pool cancels it) → the child's exit ends its pid namespace, so every process it left is gone
before anything else happens → ``fetch_files`` are read with the sandbox uid's rights, beneath the
work dir, regular files only, within one response budget → the tmpfs is detached (its size does not
matter: a deep tree costs nothing to drop). A clean-up that fails marks the worker unhealthy: it
answers the request, then exits, and the pool replaces it.
"""

from __future__ import annotations

import base64
import builtins
import ctypes
import errno
import gc
import importlib
import io
import json
import math
import os
import posixpath
import re
import resource
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

from recipe.retool.sandbox import isolation, seccomp
from recipe.retool.sandbox.cgroup import SlotCgroup
from recipe.retool.sandbox.isolation import Capabilities, Limits

_LEN = struct.Struct(">I")
TRUNCATION_MARKER = "\n[... output truncated: {omitted} more bytes ...]"
SETUP_FAILED = 121  # the child's exit status when the sandbox could not set the run up
SYS_OPENAT2 = 437  # the same number on every architecture
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x08
AREA = "/sandbox"  # each request's tmpfs, inside the allowlisted root
WORKDIR = f"{AREA}/work"
_libc = ctypes.CDLL(None, use_errno=True)


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


def send(fd: int, *msgs: dict[str, Any]) -> None:
    """Length-prefixed JSON frames, written together."""
    data = b"".join(_LEN.pack(len(body)) + body for body in (json.dumps(m).encode() for m in msgs))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ----------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------


def relative_name(name: str, workdir: str) -> str:
    """A request's file name as a path beneath the work dir; ValueError when it is not one."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"file path {name!r} is empty or contains NUL")
    if name.startswith(workdir + "/"):
        name = name[len(workdir) + 1 :]
    rel = posixpath.normpath(name.lstrip("/"))
    if rel in (".", "") or rel == ".." or rel.startswith("../"):
        raise ValueError(f"file path {name!r} leaves the work dir")
    return rel


_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)|import[ \t]+([^\n#;]+))", re.MULTILINE)


def stdlib_only(code: str, heavy: list[str]) -> bool:
    """Whether ``code`` can run in the lean zygote: every module its import statements name is in
    the standard library, and no heavy preload module is named anywhere (``__import__("sympy")``)."""
    names = "|".join(re.escape(m.split(".")[0]) for m in heavy)
    if heavy and re.search(rf"\b(?:{names})\b", code):
        return False
    for match in _IMPORT.finditer(code):
        if match.group(1) is not None:
            names = [match.group(1)]
        else:
            names = [part.split()[0] for part in match.group(2).replace("(", " ").replace(")", " ").replace("\\", " ").split(",")
                     if part.split()]
        if any(name.split(".")[0] not in sys.stdlib_module_names for name in names):
            return False
    return True


def split_preload(modules: list[str]) -> tuple[list[str], list[str]]:
    """(standard library, the rest): the lean zygote holds the first, the full one both."""
    light = [m for m in modules if m.split(".")[0] in sys.stdlib_module_names]
    return light, [m for m in modules if m not in light]


def _read_up_to(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_beneath(dirfd: int, rel: str) -> int:
    """Open ``rel`` for reading without leaving ``dirfd`` (no escaping or magic links, no FIFO wait)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, rel.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise OSError(err, os.strerror(err))
    # kernels before 5.6: walk the components ourselves and follow no symlink at all
    parts = rel.split("/")
    cur = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=cur)
    finally:
        os.close(cur)


# ----------------------------------------------------------------------------------------------
# the request child
# ----------------------------------------------------------------------------------------------


def _child_main(cmd: dict[str, Any], out_w: int, err_w: int, status_w: int, cfg: dict[str, Any],
                caps: Capabilities) -> None:
    """Runs in the forked child (pid 1 of its own pid namespace when we have one); never returns."""
    status_fd = status_w
    try:
        os.setsid()
        area = cmd["area"]
        if caps.allowlisted_root:
            isolation.unshare(isolation.CLONE_NEWNS | isolation.CLONE_NEWIPC)
            isolation.mount(None, "/", None, isolation.MS_REC | isolation.MS_PRIVATE)
            isolation.mount(f"{area}/tmp", "/tmp", None, isolation.MS_BIND)
            isolation.mount(f"{area}/shm", "/dev/shm", None, isolation.MS_BIND)
            if caps.pid_namespace:
                isolation.mount("proc", "/proc", "proc", isolation.MS_NOSUID | isolation.MS_NODEV | isolation.MS_NOEXEC)
        elif caps.ipc_namespace:
            isolation.unshare(isolation.CLONE_NEWIPC)
        _prefer_for_oom()
        os.chdir(cmd["workdir"])
        fd_in = os.open(f"{area}/.stdin", os.O_RDONLY)
        os.dup2(fd_in, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.dup2(status_w, 3)
        status_fd = 3
        os.closerange(4, min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20))
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        isolation.apply_limits(Limits(**cmd["limits"]))
        if caps.uid_drop:
            uid = int(cfg["uid"])
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif caps.user_namespace or os.geteuid() == 0:
            isolation.drop_all_capabilities()
        isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
        if caps.seccomp:
            seccomp.install()
        workdir = cmd["workdir"]
        os.environ.update({"HOME": workdir, "TMPDIR": "/tmp" if caps.allowlisted_root else workdir, "PWD": workdir})
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        sys.argv = [os.path.join(workdir, "main.py")]
        sys.path[0] = workdir  # as for `python main.py`: the script's directory first
        with open(sys.argv[0], encoding="utf-8") as fh:
            code = fh.read()
        os.close(3)
    except BaseException:
        try:
            os.write(status_fd, f"sandbox set-up failed: {traceback.format_exc()}".encode())
        finally:
            os._exit(SETUP_FAILED)
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


def _prefer_for_oom() -> None:
    """The request's processes share the slot's cgroups with the idle zygotes: make them the OOM
    killer's first choice there (raising one's own score needs no privilege; children inherit it).
    Best effort: should the zygote be killed instead, the worker notices and is replaced."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# the zygote: the pristine warm interpreter that forks request children
# ----------------------------------------------------------------------------------------------


def _zygote(sock: socket.socket, cfg: dict[str, Any], caps: Capabilities) -> None:
    """Fork one child per command; report its pid, then its exit. Never returns."""
    isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
    # what every child needs, done once here (fewer pages each child writes to): the code's
    # environment, and default signal dispositions as a fresh `python` has them
    os.environ.clear()
    os.environ.update(cfg["env"])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC) if caps.pid_namespace else -1
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 65536, 3)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)
        cmd = json.loads(msg)
        out_w, err_w, status_w = fds
        pid, error = -1, ""
        try:
            if own_pidns >= 0:
                isolation.unshare(isolation.CLONE_NEWPID)  # the next child is pid 1 of a new namespace
            try:
                pid = os.fork()
            finally:
                if own_pidns >= 0 and pid != 0:
                    isolation.setns(own_pidns, isolation.CLONE_NEWPID)  # back, so the next unshare works
        except OSError as exc:
            error = str(exc)
        if pid == 0:
            _child_main(cmd, out_w, err_w, status_w, cfg, caps)
        for fd in fds:
            os.close(fd)
        if pid < 0:
            sock.send(json.dumps({"error": error}).encode())
            continue
        sock.send(json.dumps({"pid": pid}).encode())
        _, status, ru = os.wait4(pid, 0)  # returns once the child's whole pid namespace is gone
        sock.send(json.dumps({"status": status, "cpu": ru.ru_utime + ru.ru_stime}).encode())


class Stages:
    """Where one request's time goes inside the worker, for the pool's statistics (``/health``):
    ``prepare`` (the work area and input files), ``limits`` (the slot's cgroup limits), ``fork`` (the
    zygote forks the child into its namespaces), ``run`` (the code runs, until its pid namespace is
    gone), ``run_end`` (output budget, ``fetch_files``), ``cleanup`` (the work area detached)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._us: dict[str, int] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self._us[stage] = self._us.get(stage, 0) + int((now - self._last) * 1e6)
        self._last = now

    def durations_us(self) -> dict[str, int]:
        return dict(self._us)


# ----------------------------------------------------------------------------------------------
# the manager: handles the requests' data, never forks from it
# ----------------------------------------------------------------------------------------------


@dataclass
class Zygote:
    sock: socket.socket  # commands in, pid and exit status out
    pid: int
    base_data: int  # its private writable memory: without a cgroup, a run's RLIMIT_DATA is this plus the budget
    base_address: int  # its address space: without a cgroup, a run's RLIMIT_AS is this plus room (Limits)
    warm_rss: int  # resident memory its children start with: the cgroup's budget is this plus the request's


def start_zygote(cfg: dict[str, Any], caps: Capabilities, cgroup_fds: list[int], close: list[int]) -> Zygote:
    """Fork a zygote from this (pristine, request-free) process, into the slot's cgroups.

    The zygote joins the slot once, so each request child is born in it: moving a process between
    cgroups takes a lock that waits for an RCU grace period (9-15 ms on the development machine,
    on every other request), which a fork does not."""
    base_data, base_address, warm_rss = isolation.data_bytes(), isolation.address_bytes(), isolation.resident_bytes()
    sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            sock.close()
            for fd in close:
                os.close(fd)
            for fd in cgroup_fds:
                os.write(fd, b"0")
                os.close(fd)
            _zygote(child_sock, cfg, caps)
        finally:  # never back into main() as a second manager; the worker sees a dead zygote
            os._exit(1)
    child_sock.close()
    return Zygote(sock, pid, base_data, base_address, warm_rss)


class Unhealthy(Exception):
    """This worker can no longer guarantee a clean run: answer, then exit to be replaced."""


class OutOfTime(Exception):
    """The request's run_timeout ran out before its run could start (writing its input files)."""


class Manager:
    def __init__(self, cfg: dict[str, Any], caps: Capabilities, cgroup: SlotCgroup | None, full: Zygote,
                 lean: Zygote | None, heavy: list[str], proto_in: int):
        self.cfg = cfg
        self.caps = caps
        self.cgroup = cgroup
        self.stages = Stages()
        self.full, self.lean, self.heavy = full, lean, heavy
        self.proto_in = proto_in
        self.runs = 0
        self.area = AREA if caps.allowlisted_root else tempfile.mkdtemp(prefix="retool-sandbox-")
        self.workdir = f"{self.area}/work"
        self.uid = int(cfg["uid"]) if caps.uid_drop else -1
        self.cores = len(os.sched_getaffinity(0))  # as many as a run's threads can use at once
        if self.uid >= 0:
            os.setgroups([])  # no supplementary groups while reading files as the sandbox uid

    # -- per request set-up and clean-up ---------------------------------------------------------

    def _prepare(self, req: dict[str, Any], deadline: float) -> None:
        if self.caps.allowlisted_root:
            try:
                isolation.mount("tmpfs", self.area, "tmpfs", isolation.MS_NOSUID | isolation.MS_NODEV,
                                f"size={self.cfg['tmp_size_mb']}m,nr_inodes={self.cfg['max_inodes']},mode=0755")
            except OSError as exc:
                raise Unhealthy(f"cannot mount the work area: {exc}") from exc
        else:
            os.makedirs(self.area, exist_ok=True)
        for sub, mode in (("work", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
            path = f"{self.area}/{sub}"
            os.mkdir(path)
            os.chmod(path, mode)
            if self.uid >= 0 and sub == "work":
                os.chown(path, self.uid, self.uid)
        self._write_file(f"{self.area}/.stdin", (req.get("stdin") or "").encode("utf-8"), own=False)
        for name, content in (req.get("files") or {}).items():
            self._write_input(relative_name(name, self.workdir), content, deadline)
        self._write_file(f"{self.workdir}/main.py", req["code"].encode("utf-8"))

    def _write_input(self, rel: str, content: str | None, deadline: float) -> None:
        """One input file, its directories made on the way down, each relative to the one above it (so a
        deep path costs one lookup per directory, not the whole path again each time). The HTTP front
        bounds count, depth and size; the run's deadline bounds the time whoever sends them."""
        *dirs, leaf = rel.split("/")
        cur = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in dirs:
                if time.perf_counter() > deadline:
                    raise OutOfTime
                try:
                    os.mkdir(part, 0o755, dir_fd=cur)
                    if self.uid >= 0:
                        os.chown(part, self.uid, self.uid, dir_fd=cur, follow_symlinks=False)
                except FileExistsError:
                    pass
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                os.close(cur)
                cur = nxt
            if time.perf_counter() > deadline:
                raise OutOfTime
            self._write_file(leaf, base64.b64decode(content, validate=True) if content else b"", dir_fd=cur)
        finally:
            os.close(cur)

    def _write_file(self, path: str, data: bytes, own: bool = True, dir_fd: int | None = None) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644 if own else 0o600,
                     dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if own and self.uid >= 0:
                os.fchown(fd, self.uid, self.uid)
        finally:
            os.close(fd)

    def _cleanup(self) -> None:
        """Drop the request's tmpfs whole (O(1) whatever it holds); any failure makes us unhealthy."""
        if self.caps.allowlisted_root:
            try:
                isolation.umount(self.area)
            except OSError as exc:
                raise Unhealthy(f"cannot detach the work area: {exc}") from exc
            if os.listdir(self.area):
                raise Unhealthy("the work area is not empty after detaching it")
        else:
            shutil.rmtree(self.area, ignore_errors=True)
            if os.path.exists(self.area):
                raise Unhealthy(f"cannot remove {self.area}")
        for zygote in filter(None, (self.full, self.lean)):
            try:
                done, _ = os.waitpid(zygote.pid, os.WNOHANG)
            except ChildProcessError:
                done = zygote.pid
            if done:
                raise Unhealthy("a zygote exited")

    def _zygote_for(self, code: str) -> Zygote:
        return self.lean if self.lean is not None and stdlib_only(code, self.heavy) else self.full

    def _limits(self, req: dict[str, Any], zygote: Zygote) -> tuple[Limits, int]:
        mem_mb = req.get("memory_limit_MB")
        if mem_mb is None or mem_mb <= 0:
            mem_mb = self.cfg["default_memory_mb"]
        mem_mb = min(int(mem_mb), self.cfg["max_memory_mb"])
        limits = Limits(
            # the slot's memory cgroup bounds what the whole run uses (set_limits); without one, each
            # process's private writable memory, on top of the warm interpreter's (a MemoryError)
            data_bytes=None if self.cgroup is not None else zygote.base_data + mem_mb * 1024 * 1024,
            # RLIMIT_DATA leaves out shared anonymous memory (mmap(-1, n) with MAP_SHARED): without a
            # cgroup, a generous address-space limit stands behind it (isolation.THREAD_ROOM)
            address_bytes=None if self.cgroup is not None else
            zygote.base_address + 2 * mem_mb * 1024 * 1024 + isolation.THREAD_ROOM,
            # CPU seconds, counted over all of a process's threads: a process on every core may spend
            # run_timeout × cores of them before the wall-clock deadline, which must come first
            cpu_seconds=math.ceil(float(req["run_timeout"]) * self.cores) + 1,
            # RLIMIT_NPROC counts every process of the uid, not the run's: only where no pids cgroup
            # bounds the run (the uid is this slot's alone, of a range this server claimed)
            max_processes=None if self.cgroup is not None and self.cgroup.bounds_pids else self.cfg["max_processes"],
            max_file_bytes=self.cfg["max_file_mb"] * 1024 * 1024,
            max_open_files=self.cfg["max_open_files"],
        )
        return limits, mem_mb

    # -- one request -------------------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        if not req.get("probe"):  # the pool's start-up probe does not count towards recycling
            self.runs += 1
        self.stages = Stages()
        # the request's time starts now: writing its input files counts against its run_timeout
        start = time.perf_counter()
        deadline = start + float(req["run_timeout"])
        try:
            self._prepare(req, deadline)
        except Unhealthy:
            raise
        except OutOfTime:
            self._cleanup()
            return {"status": "Failed", "compile_result": None, "executor_pod_name": None, "files": {},
                    "message": f"the input files were not all written within run_timeout ({req['run_timeout']:g}s)",
                    "run_result": {"status": "TimeLimitExceeded", "execution_time": round(time.perf_counter() - start, 6),
                                   "cpu_time": None, "return_code": None, "stdout": "", "stderr": ""}}
        except (ValueError, OSError, UnicodeError) as exc:
            self._cleanup()
            return {"status": "SandboxError", "message": f"cannot write input files: {exc}"}
        self.stages.mark("prepare")
        try:
            return self._run(req, deadline)
        finally:
            self.stages.mark("run_end")
            self._cleanup()
            self.stages.mark("cleanup")

    def _run(self, req: dict[str, Any], deadline: float) -> dict[str, Any]:
        zygote = self._zygote_for(req["code"])
        limits, mem_mb = self._limits(req, zygote)
        oom_before = 0
        if self.cgroup is not None:
            try:
                # the idle zygotes count towards pids.max
                zygotes = 1 + (self.lean is not None)
                self.cgroup.set_limits(mem_mb * 1024 * 1024 + zygote.warm_rss, self.cfg["max_processes"] + zygotes)
                oom_before = self.cgroup.oom_kills()
            except OSError as exc:
                raise Unhealthy(f"cannot set the request's cgroup limits: {exc}") from exc
        self.stages.mark("limits")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        cmd = {"area": self.area, "workdir": self.workdir, "limits": limits.__dict__}
        start = time.perf_counter()
        try:
            socket.send_fds(zygote.sock, [json.dumps(cmd).encode()], [out_w, err_w, st_w])
        finally:
            for fd in (out_w, err_w, st_w):
                os.close(fd)
        try:
            reply = self._zygote_reply(zygote, 10.0)
        except Unhealthy:
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            raise
        if "pid" not in reply:
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            return {"status": "SandboxError", "message": f"cannot start the run: {reply.get('error')}"}
        self.stages.mark("fork")
        stdout, stderr, ended, why = self._collect(zygote, reply["pid"], out_r, err_r, deadline, req.get("id"))
        elapsed = time.perf_counter() - start
        self.stages.mark("run")
        os.set_blocking(st_r, False)
        try:
            setup_error = os.read(st_r, 65536).decode("utf-8", "replace")
        except BlockingIOError:
            setup_error = ""
        os.close(st_r)
        wait_status, cpu = ended["status"], ended.get("cpu")
        oom = self.cgroup is not None and self.cgroup.oom_kills() > oom_before
        if why == "cancelled":
            return {"status": "SandboxError", "message": "cancelled: the client went away"}
        if setup_error and os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == SETUP_FAILED:
            return {"status": "SandboxError", "message": setup_error[-2000:], "compile_result": None,
                    "run_result": {"status": "Error", "execution_time": round(elapsed, 6), "cpu_time": None,
                                   "return_code": None, "stdout": "", "stderr": ""},
                    "executor_pod_name": None, "files": {}}
        if why == "timeout":
            run_status, return_code = "TimeLimitExceeded", None
        elif os.WIFEXITED(wait_status):
            run_status, return_code = "Finished", os.WEXITSTATUS(wait_status)
        else:
            sig = os.WTERMSIG(wait_status)
            return_code = -sig
            # the CPU-time rlimit: SIGXCPU, or SIGKILL at the hard limit when SIGXCPU was caught or ignored
            over_cpu = sig == signal.SIGKILL and not oom and cpu is not None and cpu >= limits.cpu_seconds
            run_status = "TimeLimitExceeded" if sig == signal.SIGXCPU or over_cpu else "Finished"
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            stderr += f"\n[killed by signal {name}]"
        if oom:
            stderr += f"\n[a process was killed: the request's memory budget ({mem_mb} MB) was exhausted]"
        fetched, problems = self._fetch(req.get("fetch_files") or [])
        ok = run_status == "Finished" and return_code == 0
        return {
            "status": "Success" if ok else "Failed",
            "message": "; ".join(problems),
            "compile_result": None,
            "run_result": {
                "status": run_status,
                "execution_time": round(elapsed, 6),
                "cpu_time": round(cpu, 6) if cpu is not None else None,
                "return_code": return_code,
                "stdout": stdout,
                "stderr": stderr,
            },
            "executor_pod_name": None,
            "files": fetched,
        }

    @staticmethod
    def _zygote_reply(zygote: Zygote, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([zygote.sock], [], [], timeout)
        if not ready:
            raise Unhealthy(f"the zygote did not answer within {timeout:.0f}s")
        data = zygote.sock.recv(65536)
        if not data:
            raise Unhealthy("the zygote is gone")
        return json.loads(data)

    def _collect(self, zygote: Zygote, pid: int, out_r: int, err_r: int, deadline: float,
                 req_id: Any) -> tuple[str, str, dict[str, Any], str | None]:
        """Output (capped) until the zygote reports the end of the run; kill at the deadline or on cancel."""
        cap = self.cfg["max_output_bytes"]
        bufs = {out_r: bytearray(), err_r: bytearray()}
        total = {out_r: 0, err_r: 0}
        open_fds = {out_r, err_r}
        why, ended, killed_at = None, None, None
        zfd = zygote.sock.fileno()
        try:
            while ended is None or open_fds:
                now = time.perf_counter()
                if ended is None and killed_at is None and now >= deadline:
                    why = "timeout"
                    killed_at = self._kill(pid)
                if killed_at is not None and ended is None and now - killed_at > self.cfg["kill_grace_s"]:
                    raise Unhealthy(f"a run did not end {self.cfg['kill_grace_s']:g}s after SIGKILL")
                watch = list(open_fds) + ([zfd, self.proto_in] if ended is None else [])
                wait = 0.05 if ended is not None else (deadline - now if killed_at is None else 0.1)
                ready, _, _ = select.select(watch, [], [], max(wait, 0.0))
                if ended is not None and not ready:
                    break  # the run is over (its namespace is gone): nothing more can arrive
                for fd in ready:
                    if fd == zfd:
                        ended = self._zygote_reply(zygote, 0)
                    elif fd == self.proto_in:
                        try:
                            msg = recv(self.proto_in)
                        except EOFError:
                            msg = {"op": "cancel", "id": req_id}
                        if msg.get("op") == "cancel" and msg.get("id") == req_id and killed_at is None:
                            why = "cancelled"
                            killed_at = self._kill(pid)
                    else:
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            open_fds.discard(fd)
                            continue
                        total[fd] += len(chunk)
                        room = cap - len(bufs[fd])
                        if room > 0:
                            bufs[fd] += chunk[:room]
        finally:
            for fd in (out_r, err_r):
                os.close(fd)

        def text(fd: int) -> str:
            s = bufs[fd].decode("utf-8", errors="replace")
            if total[fd] > len(bufs[fd]):
                s += TRUNCATION_MARKER.format(omitted=total[fd] - len(bufs[fd]))
            return s

        return text(out_r), text(err_r), ended, why

    @staticmethod
    def _kill(pid: int) -> float:
        """SIGKILL the run's first process: as pid 1 of its namespace, its death takes the rest along."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return time.perf_counter()

    # -- fetch_files -------------------------------------------------------------------------------

    def _as_sandbox_user(self, enter: bool) -> None:
        if self.uid < 0:
            return
        if enter:
            os.setresgid(self.uid, self.uid, 0)
            os.setresuid(self.uid, self.uid, 0)
        else:
            os.setresuid(0, 0, 0)
            os.setresgid(0, 0, 0)

    def _fetch(self, names: list[str]) -> tuple[dict[str, str], list[str]]:
        """Read back requested files: every process of the run is gone; read as the sandbox uid."""
        budget = self.cfg["max_fetch_bytes"]
        fetched: dict[str, str] = {}
        missing: list[str] = []
        refused: list[str] = []
        used = 0
        if not names:
            return fetched, []
        self._as_sandbox_user(True)
        try:
            dirfd = os.open(self.workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name in names:
                    if name in fetched:
                        continue  # the same name twice: one answer
                    try:
                        fd = open_beneath(dirfd, relative_name(name, self.workdir))
                    except (ValueError, OSError):
                        missing.append(name)
                        continue
                    try:
                        st = os.fstat(fd)
                        if not stat.S_ISREG(st.st_mode):
                            refused.append(f"{name} (not a regular file)")
                            continue
                        room = budget - used
                        data = _read_up_to(fd, room + 1) if room > 0 else b"x"
                        if len(data) > room:
                            refused.append(f"{name} (over the {budget} bytes all fetched files may total)")
                            continue
                        used += len(data)  # aliases of one file count every time: the response holds each
                        fetched[name] = base64.b64encode(data).decode()
                    except OSError:
                        missing.append(name)
                    finally:
                        os.close(fd)
            finally:
                os.close(dirfd)
        finally:
            self._as_sandbox_user(False)
        problems = []
        if missing:
            problems.append(f"files not found: {missing}")
        if refused:
            problems.append(f"files not returned: {', '.join(refused)}")
        return fetched, problems


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


def _seccomp_works() -> bool:
    """Install the filter in a throw-away child and check that it denies what it should."""
    pid = os.fork()
    if pid == 0:
        try:
            isolation.prctl(isolation.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.install()
            nrs = seccomp.SYSCALLS[seccomp.machine()]
            denied = _libc.syscall(nrs["keyctl"], 0, 0, 0, 0, 0) == -1 and ctypes.get_errno() == errno.EPERM
            denied &= _libc.unshare(isolation.CLONE_NEWUSER) == -1 and ctypes.get_errno() == errno.EPERM
            # AF_NETLINK: every kernel has it, so only the filter answers EAFNOSUPPORT (AF_VSOCK would
            # answer so anyway on a host without the vsock module, proving nothing)
            denied &= _libc.socket(16, socket.SOCK_RAW, 0) == -1 and ctypes.get_errno() == errno.EAFNOSUPPORT
            os._exit(0 if denied else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # stdin, stdout and stderr are all a worker is given; anything else it inherited (an event loop's
    # spawn that ignores close_fds, a descriptor left inheritable) is not for it, nor for its runs
    os.closerange(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20))
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    light, heavy = split_preload(cfg["preload"])
    preloaded = _preload(light)
    caps = Capabilities()
    cgroup = None
    if cfg.get("cgroup"):
        try:
            cgroup = SlotCgroup(cfg["cgroup"], f"slot{cfg['slot']}")
            caps.cgroup = f"v{cgroup.version}"
        except OSError as exc:
            caps.errors.append(f"cgroup: {exc}")
    if cfg["isolate"]:
        isolation.enter_namespaces(caps, int(cfg["uid"]))
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
        isolation.build_root(caps, isolation.python_paths(), list(isolation.PER_RUN_DIRS))
        caps.uid_drop = caps.root
        try:
            seccomp.compile_filter()  # once, before the zygote is forked
            caps.seccomp = _seccomp_works()
        except OSError as exc:
            caps.errors.append(f"seccomp: {exc}")
    cgroup_fds = cgroup.procs_fds if cgroup is not None else []
    lean = None
    if cfg.get("lean_zygote", True) and heavy:
        gc.collect()
        gc.freeze()  # keep the collector off the inherited objects: fewer copy-on-write faults per child
        lean = start_zygote(cfg, caps, cgroup_fds, [proto_in, proto_out])
    preloaded += _preload(heavy)  # in the manager, inside the allowlisted root: the same files the children see
    if cfg.get("warmup", True):
        _warm_up()
    gc.collect()
    gc.freeze()
    full = start_zygote(cfg, caps, cgroup_fds, [proto_in, proto_out] + ([lean.sock.fileno()] if lean else []))
    for fd in cgroup_fds:
        os.close(fd)  # only the zygotes (and the children they fork) join; we just set limits
    manager = Manager(cfg, caps, cgroup, full, lean, heavy, proto_in)
    send(proto_out, {"ready": True, "pid": os.getpid(), "capabilities": caps.as_dict(), "preloaded": preloaded,
                     "warm_rss_mb": round(full.warm_rss / 2**20),
                     "lean_rss_mb": round(lean.warm_rss / 2**20) if lean else None})
    while True:
        try:
            req = recv(proto_in)
            if req.get("op") == "cancel":
                continue  # for a request already answered
            # a run: the pool's header (op, id, the clamped run_timeout), then the request as the
            # HTTP front encoded it; the header wins where both name a key
            req = {**recv(proto_in), **req}
        except EOFError:
            break
        unhealthy = None
        try:
            resp = manager.handle(req)
        except Unhealthy as exc:
            unhealthy = str(exc)
            resp = {"status": "SandboxError", "message": f"sandbox worker failed: {exc}"}
        except Exception as exc:  # a bug here must not take the worker down silently
            unhealthy = f"{type(exc).__name__}: {exc}"
            resp = {"status": "SandboxError", "message": f"worker error: {unhealthy}"}
        # the pool reads the small first frame; the response itself goes on to the client untouched
        meta = {"status": resp.get("status"), "stages_us": manager.stages.durations_us()}
        if unhealthy:
            meta["unhealthy"] = unhealthy
        send(proto_out, meta, resp)
        if unhealthy or manager.runs >= cfg["recycle_after"]:
            break


if __name__ == "__main__":
    main()
