"""Linux isolation primitives for sandbox workers (ctypes; Python 3.11's ``os`` has no ``unshare``).

A worker confines *itself* once at start-up, then forks one child per request inside that
confinement (so the per-request cost is a fork, not an interpreter start):

- namespaces: network (no interface is up: nothing, not even the server's loopback port, is
  reachable), pid (the worker is pid 1: the child sees only sandbox processes, and ``kill(-1)``
  sweeps every leftover process after each run), mount (private ``/tmp`` and ``/dev/shm`` tmpfs,
  home directories and the server's working tree masked, the root filesystem read-only), ipc, uts;
  a user namespace first when not running as root.
- per request: uid/gid drop to a per-worker unprivileged uid when root (else capabilities dropped),
  ``no_new_privs``, rlimits (address space, CPU, processes, file size, open files, no core files),
  its own session/process group, a scrubbed environment.

Each step is tried and recorded in :class:`Capabilities`; the server refuses to start when a
required one is missing unless explicitly allowed (``--allow-unsafe``), and logs what it got.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
from dataclasses import asdict, dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_all_capabilities() -> None:
    """Empty the bounding, effective, permitted and inheritable capability sets of this process."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


@dataclass
class Capabilities:
    """What a worker achieved at start-up (reported to the server, logged, checked)."""

    root: bool = False
    user_namespace: bool = False
    net_namespace: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False
    ipc_namespace: bool = False
    private_tmp: bool = False
    readonly_root: bool = False
    uid_drop: bool = False
    masked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def missing_for_safe_mode(self) -> list[str]:
        """The properties we insist on, by name; empty when the worker is safe to serve."""
        missing = []
        if not self.net_namespace:
            missing.append("network namespace (code could reach the server and loopback services)")
        if not (self.pid_namespace or self.uid_drop):
            missing.append("pid namespace or uid drop (code could signal the server)")
        if not self.private_tmp:
            missing.append("private /tmp (runs could leave files for each other)")
        if not (self.uid_drop or self.readonly_root):
            missing.append("uid drop or read-only root (code could write outside its work dir)")
        return missing

    def as_dict(self) -> dict:
        return asdict(self)


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def enter_namespaces(caps: Capabilities) -> None:
    """unshare() into new namespaces (a user namespace first when not root). Records what worked."""
    caps.root = os.geteuid() == 0
    base = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    attempts = [base] if caps.root else [base | CLONE_NEWUSER]
    attempts.append(CLONE_NEWNET | (0 if caps.root else CLONE_NEWUSER))  # at least the network
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts:
        try:
            unshare(flags)
        except OSError as exc:
            caps.errors.append(str(exc))
            continue
        if flags & CLONE_NEWUSER:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
            caps.user_namespace = True
        caps.net_namespace = bool(flags & CLONE_NEWNET)
        caps.pid_namespace = bool(flags & CLONE_NEWPID)
        caps.mount_namespace = bool(flags & CLONE_NEWNS)
        caps.ipc_namespace = bool(flags & CLONE_NEWIPC)
        return


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.abspath(path), os.path.abspath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def setup_mounts(caps: Capabilities, tmp_size_mb: int, mask: list[str], expose: list[str]) -> None:
    """Inside the new mount namespace (called as pid 1 of the new pid namespace)."""
    if not caps.mount_namespace:
        return
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        if caps.pid_namespace:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size_mb}m,mode=0711")
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_size_mb}m,mode=1777")
        caps.private_tmp = True
    except OSError as exc:
        caps.errors.append(str(exc))
        return
    # Hide home directories and the server's tree, but keep the interpreter and its packages visible.
    for directory in mask:
        if not os.path.isdir(directory) or any(_under(directory, m) and directory != m for m in caps.masked):
            continue
        keep = sorted({p for p in expose if _under(p, directory) and os.path.exists(p) and p != directory})
        keep = [p for p in keep if not any(_under(p, q) and p != q for q in keep)]  # outermost only
        if any(_under(directory, p) for p in expose if os.path.exists(p)):
            continue  # masking it would hide the interpreter itself
        try:
            staged = []
            for i, path in enumerate(keep):
                stage = f"/tmp/.stage{len(caps.masked)}_{i}"
                os.makedirs(stage)
                mount(path, stage, None, MS_BIND | MS_REC)
                staged.append((stage, path))
            mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for stage, path in staged:
                os.makedirs(path, exist_ok=True)
                mount(stage, path, None, MS_MOVE)
                os.rmdir(stage)
            caps.masked.append(directory)
        except OSError as exc:
            caps.errors.append(f"mask {directory}: {exc}")
    try:  # the root filesystem read-only: world-writable dirs like /var/tmp and /run/lock become unwritable
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        caps.readonly_root = True
    except OSError as exc:
        caps.errors.append(f"read-only root: {exc}")
    if caps.ipc_namespace:
        try:
            sethostname("sandbox")
        except OSError:
            pass


def python_paths() -> list[str]:
    """Directories the interpreter needs to keep importing modules after masking."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    # only library directories: an editable install puts the repo itself on sys.path, and the
    # repo (with its .env) is exactly what we want hidden from sandboxed code
    libs = {p for p in sys.path if p and os.path.isdir(p) and ("-packages" in p or any(_under(p, q) for q in prefixes))}
    return sorted({os.path.realpath(p) for p in prefixes | libs})


@dataclass
class Limits:
    memory_bytes: int | None
    cpu_seconds: int
    max_processes: int
    max_file_bytes: int
    max_open_files: int


def apply_limits(limits: Limits) -> None:
    """In the request child, before running user code."""
    def setl(which: int, value: int) -> None:
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    setl(resource.RLIMIT_CORE, 0)
    setl(resource.RLIMIT_CPU, limits.cpu_seconds)
    setl(resource.RLIMIT_NPROC, limits.max_processes)
    setl(resource.RLIMIT_FSIZE, limits.max_file_bytes)
    setl(resource.RLIMIT_NOFILE, limits.max_open_files)
    if limits.memory_bytes:
        setl(resource.RLIMIT_AS, limits.memory_bytes)


def current_address_space() -> int:
    """Virtual memory already mapped by this process (the preloaded modules), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()
