"""Per-request memory and process budgets with cgroups (v1 or v2, whichever holds the controllers).

An rlimit bounds one process; a request can fork, map a memfd or create shared memory, and each of
those escapes a per-process limit. A cgroup counts them all: every page any process of the request
touches (heap, tmpfs files, memfd, SysV shm, page tables) is charged to it, and ``pids.max`` bounds
its processes and threads.

Layout: the pool makes one directory per server process under its own cgroup
(``<own cgroup>/retool-sandbox-<pid>``); each worker makes ``slot<N>`` under it at start-up, while
it can still see ``/sys/fs/cgroup``, and keeps file descriptors to it. The worker's zygotes join the
slot once (writing ``0`` to the ``cgroup.procs`` descriptor), so every request process is born in
it; per request the worker sets the slot's limits. Besides the idle zygotes (whose pages were
charged before they joined; a request's processes raise their own ``oom_score_adj`` so that the OOM
killer takes them first), only one request's processes
are ever in a slot, so its counters describe one request at a time.

v1 (the hybrid layout of many hosts: ``memory`` and ``pids`` as separate hierarchies) and v2 (one
unified tree) are both handled; :func:`prepare` reports which one it uses or says why neither works.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids")
PREFIX = "retool-sandbox-"


class CgroupUnavailable(RuntimeError):
    """No cgroup hierarchy here lets us bound a request's memory and processes."""


@dataclass
class CgroupPlan:
    """Where this server's slots live: v1 {"memory": dir, "pids": dir}, v2 {"unified": dir}."""

    version: int
    dirs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"version": self.version, "dirs": dict(self.dirs)}


def _mounts() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of every cgroup mount we can see."""
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            if len(rparts) >= 3 and rparts[0] in ("cgroup", "cgroup2"):
                out.append((parts[3], parts[4], rparts[0], rparts[2]))
    return out


def _own_paths() -> dict[str, str]:
    """Our cgroup per v1 controller, and ``""`` → our v2 cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                paths[c] = path
    return paths


def _join(mount_root: str, mount_point: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return os.path.normpath(os.path.join(mount_point, "" if rel == "." else rel))


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _rmdir(path: str, wait_s: float) -> None:
    """rmdir a cgroup, waiting up to ``wait_s`` while it is busy: a slot's warm interpreters are
    killed with their worker's pid namespace, and the kernel reaps them a moment later."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                logger.warning("cannot remove cgroup %s: %s", path, exc)
                return
        time.sleep(0.02)


def _remove_tree(base: str, wait_s: float = 2.0) -> None:
    """rmdir the slot directories, then the base (cgroup dirs are removed with rmdir, not unlink)."""
    if not os.path.isdir(base):
        return
    for name in os.listdir(base):
        sub = os.path.join(base, name)
        if os.path.isdir(sub):
            _rmdir(sub, wait_s)
    _rmdir(base, wait_s)


def _sweep_stale(parent: str) -> None:
    """Remove directories left by servers of ours that are gone (their pid no longer exists)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX):].removeprefix("server-")  # a server's directory, or the leaf it moved into
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove_tree(os.path.join(parent, name), wait_s=0)


def _v2_here(mounts, own: dict[str, str]) -> tuple[str, list[str]]:
    v2 = [m for m in mounts if m[2] == "cgroup2"]
    if not v2 or "" not in own:
        raise CgroupUnavailable("no cgroup v2 mount")
    root, point, _, _ = v2[0]
    here = _join(root, point, own[""])
    with open(os.path.join(here, "cgroup.controllers")) as fh:
        have = fh.read().split()
    if "memory" not in have:
        raise CgroupUnavailable(f"cgroup v2 at {here} offers {have or 'no controllers'}, not memory")
    return here, have


def _enable_v2(here: str, have: list[str]) -> str:
    """Enable our controllers for the children of ``here``; returns what was enabled."""
    # pids is optional: without it a request's processes are bounded by RLIMIT_NPROC (one uid per slot)
    # and by its own pid namespace, as on hosts whose v2 tree delegates only memory
    enable = " ".join(f"+{c}" for c in CONTROLLERS if c in have)
    try:
        _write(os.path.join(here, "cgroup.subtree_control"), enable)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise CgroupUnavailable(f"cannot enable {enable} under {here}: {exc}") from exc
        # "no internal processes": move this server into a leaf of its own, then enable
        leaf = os.path.join(here, f"{PREFIX}server-{os.getpid()}")
        os.makedirs(leaf, exist_ok=True)
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        try:
            _write(os.path.join(here, "cgroup.subtree_control"), enable)
        except OSError as exc2:
            raise CgroupUnavailable(f"cannot enable {enable} under {here} (other processes live there; "
                                    f"start the server in a cgroup of its own): {exc2}") from exc2
    return enable


def _prepare_v2(mounts, own: dict[str, str], name: str) -> CgroupPlan:
    here, have = _v2_here(mounts, own)
    enable = _enable_v2(here, have)
    _sweep_stale(here)
    base = os.path.join(here, name)
    os.makedirs(base, exist_ok=True)
    _write(os.path.join(base, "cgroup.subtree_control"), enable)
    return CgroupPlan(2, {"unified": base})


def _prepare_v1(mounts, own: dict[str, str], name: str) -> CgroupPlan:
    dirs = {}
    for c in CONTROLLERS:
        found = [m for m in mounts if m[2] == "cgroup" and c in m[3].split(",")]
        if not found or c not in own:
            raise CgroupUnavailable(f"no cgroup v1 '{c}' hierarchy")
        root, point, _, _ = found[0]
        parent = _join(root, point, own[c])
        _sweep_stale(parent)
        base = os.path.join(parent, name)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot create {base}: {exc}") from exc
        if c == "memory" and os.path.exists(os.path.join(base, "memory.use_hierarchy")):
            try:
                _write(os.path.join(base, "memory.use_hierarchy"), "1")
            except OSError:
                pass  # already inherited from the parent
        dirs[c] = base
    return CgroupPlan(1, dirs)


def prepare(name: str | None = None) -> CgroupPlan:
    """Make this server's cgroup directory (v2 when it has memory, else v1)."""
    name = name or f"{PREFIX}{os.getpid()}"
    mounts, own = _mounts(), _own_paths()
    reasons = []
    for attempt in (_prepare_v2, _prepare_v1):
        try:
            plan = attempt(mounts, own, name)
            logger.info("per-request budgets: cgroup v%d at %s", plan.version, plan.dirs)
            return plan
        except (CgroupUnavailable, OSError) as exc:
            reasons.append(str(exc))
    raise CgroupUnavailable("; ".join(reasons))


def remove(plan: CgroupPlan | dict) -> None:
    dirs = plan.dirs if isinstance(plan, CgroupPlan) else plan["dirs"]
    for base in dirs.values():
        _remove_tree(base)


class SlotCgroup:
    """One worker's slot: created before confinement, then driven through open descriptors."""

    def __init__(self, plan: dict, slot: str):
        self.version = int(plan["version"])
        self.dirs = {k: os.path.join(v, slot) for k, v in plan["dirs"].items()}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        self.procs_fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC) for d in self.dirs.values()]
        if self.version == 1:
            mem, pids = self.dirs["memory"], self.dirs["pids"]
            self._mem_limit = self._open(mem, "memory.limit_in_bytes", os.O_WRONLY)
            self._memsw_limit = self._open(mem, "memory.memsw.limit_in_bytes", os.O_WRONLY, optional=True)
            self._oom = self._open(mem, "memory.oom_control", os.O_RDONLY)
            self._peak = self._open(mem, "memory.max_usage_in_bytes", os.O_RDWR)
            self._pids_max = self._open(pids, "pids.max", os.O_WRONLY)
            self._force_empty = self._open(mem, "memory.force_empty", os.O_WRONLY, optional=True)
        else:
            d = self.dirs["unified"]
            self._mem_limit = self._open(d, "memory.max", os.O_WRONLY)
            self._memsw_limit = self._open(d, "memory.swap.max", os.O_WRONLY, optional=True)
            self._oom = self._open(d, "memory.events", os.O_RDONLY)
            self._peak = self._open(d, "memory.peak", os.O_RDONLY, optional=True)
            self._pids_max = self._open(d, "pids.max", os.O_WRONLY, optional=True)  # see _prepare_v2
            if self._memsw_limit is not None:
                os.write(self._memsw_limit, b"0")  # no swap: the budget is real memory
                self._memsw_limit = None

    @staticmethod
    def _open(d: str, name: str, flags: int, optional: bool = False) -> int | None:
        try:
            return os.open(os.path.join(d, name), flags | os.O_CLOEXEC)
        except FileNotFoundError:
            if optional:
                return None
            raise

    def set_limits(self, memory_bytes: int, max_pids: int) -> None:
        """Called between requests, when no request process is in the slot."""
        value = str(memory_bytes).encode()
        try:
            try:
                os.write(self._mem_limit, value)
            except OSError as exc:
                # v1 refuses a limit below what is still charged (page cache an earlier request read):
                # with the slot empty, reclaim all of it and try again
                if exc.errno != errno.EBUSY or self.version != 1 or self._force_empty is None:
                    raise
                try:
                    os.write(self._force_empty, b"0")
                except OSError:
                    pass  # what the idle zygotes hold cannot be reclaimed; the rest was
                os.write(self._mem_limit, value)
        except OSError as exc:
            # v1: raising the limit above memory+swap's fails until that one is raised first
            if exc.errno != errno.EINVAL or self._memsw_limit is None:
                raise
            os.write(self._memsw_limit, value)
            os.write(self._mem_limit, value)
        else:
            if self._memsw_limit is not None:
                os.write(self._memsw_limit, value)
        if self._pids_max is not None:
            os.write(self._pids_max, str(max_pids).encode())
        if self.version == 1:
            os.write(self._peak, b"0")

    @property
    def bounds_pids(self) -> bool:
        """Whether ``pids.max`` bounds the slot's processes (a v2 tree may delegate only memory)."""
        return self._pids_max is not None

    def oom_kills(self) -> int:
        for line in os.pread(self._oom, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak_bytes(self) -> int | None:
        if self._peak is None:
            return None
        try:
            return int(os.pread(self._peak, 64, 0).split()[0])
        except (OSError, ValueError, IndexError):
            return None
