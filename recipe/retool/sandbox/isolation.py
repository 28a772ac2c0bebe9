"""Linux isolation primitives for sandbox workers (ctypes; Python 3.11's ``os`` has no ``unshare``).

A worker confines *itself* once at start-up, then forks one child per request inside that
confinement (so the per-request cost is a fork, not an interpreter start).

Once per worker:

- namespaces: network (no interface is up: nothing, not even the server's loopback port or a host
  abstract unix socket, is reachable), pid, mount, ipc, uts; a user namespace first when not root;
- an **allowlisted root** (:func:`build_root`): a fresh tmpfs holding read-only bind mounts of the
  system directories (``/usr``, ``/lib*``, ``/bin``), the Python installation and its
  site-packages, a handful of ``/etc`` files, ``/dev/{null,zero,full,random,urandom}``, a fresh
  ``/proc``; then ``pivot_root`` into it and detach the host's tree. Nothing else of the host
  exists there: not ``/run`` or ``/var`` (their unix sockets), not homes, not the server's
  working tree wherever it was started from.

Per request (in the child, before the user's code; see ``worker.py``): a new pid namespace (the
request's first process is its pid 1: when it exits the kernel kills everything it left behind,
and nothing outside it can be seen or signalled), new ipc and mount namespaces (fresh SysV IPC,
private ``/tmp``, ``/dev/shm`` and ``/proc``), the slot's cgroup (which bounds the memory a run
uses, and its processes and threads), uid/gid drop to a per-slot
unprivileged uid when root (from a range each server claims for itself, :func:`claim_uids`, so no
two servers on a host share one; else every capability dropped), ``no_new_privs``, the seccomp filter
(``seccomp.py``), rlimits, a scrubbed environment.

Each step is tried and recorded in :class:`Capabilities`; the server refuses to start when a
required one is missing unless explicitly allowed (``--allow-unsafe``), and logs what it got.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field

from recipe.retool.sandbox.seccomp import SYSCALLS, machine

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
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


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


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


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

    root: bool = False  # root with a uid range to drop to (else children keep our uid, minus capabilities)
    user_namespace: bool = False
    net_namespace: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False
    ipc_namespace: bool = False
    allowlisted_root: bool = False
    readonly_root: bool = False
    uid_drop: bool = False
    seccomp: bool = False
    cgroup: str | None = None  # "v1" | "v2": per-request memory and pids budgets
    exposed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def missing_for_safe_mode(self) -> list[str]:
        """The properties we insist on, by name; empty when the worker is safe to serve."""
        missing = []
        if not self.net_namespace:
            missing.append("network namespace (code could reach the server, loopback services, host abstract sockets)")
        if not self.pid_namespace:
            missing.append("pid namespace (code could see and signal other processes; leftovers would not be reaped)")
        if not (self.mount_namespace and self.allowlisted_root and self.readonly_root):
            missing.append("allowlisted read-only root (code could reach host files and unix sockets)")
        if not self.ipc_namespace:
            missing.append("ipc namespace (SysV IPC objects would outlive a request)")
        if not (self.uid_drop or self.user_namespace):
            missing.append("uid drop or user namespace (code would keep the server's privileges)")
        if not self.seccomp:
            missing.append("seccomp filter (keyrings, nested namespaces and io_uring would stay open)")
        if not self.cgroup:
            missing.append("memory and pids cgroup (memory_limit_MB would bound one process, not the request)")
        return missing

    def as_dict(self) -> dict:
        return asdict(self)


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def uid_mapped(uid: int) -> bool:
    """Whether ``uid`` exists in our user namespace (root in a rootless container may have just itself)."""
    try:
        with open("/proc/self/uid_map") as fh:
            for line in fh:
                inside, _, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return True
    except (OSError, ValueError):
        pass
    return False


def enter_namespaces(caps: Capabilities, drop_to_uid: int) -> None:
    """unshare() into new namespaces (a user namespace first when not root). Records what worked."""
    is_root = os.geteuid() == 0
    caps.root = is_root and uid_mapped(drop_to_uid)
    base = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    attempts = [base] if is_root else [base | CLONE_NEWUSER]
    attempts.append(CLONE_NEWNET | (0 if is_root else CLONE_NEWUSER))  # at least the network
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


# What the allowlisted root holds besides the Python installation (each only if it exists here).
SYSTEM_DIRS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
ETC_FILES = ["passwd", "group", "hosts", "nsswitch.conf", "host.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
             "localtime", "timezone", "os-release", "alternatives", "mime.types", "protocols", "services"]
DEV_NODES = ["null", "zero", "full", "random", "urandom"]
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
NEW_ROOT = "/tmp"  # where the new root is assembled, inside our private mount namespace (a directory every host has)
# statvfs flags → mount flags to keep when remounting a bind read-only (a user namespace may not drop them)
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: 1024, 2048: 2048, 4096: 1 << 21}


def _remount_readonly(target: str, extra: int = 0) -> None:
    keep = 0
    flags = os.statvfs(target).f_flag
    for st, ms in _ST_TO_MS.items():
        if flags & st:
            keep |= ms
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep | extra)


def _bind(src: str, dst: str) -> None:
    try:
        mount(src, dst, None, MS_BIND)
    except OSError as exc:  # a user namespace refuses a non-recursive bind over locked sub-mounts
        if exc.errno != errno.EINVAL:
            raise
        mount(src, dst, None, MS_BIND | MS_REC)


def _mirror(src: str, new_root: str, readonly: bool = True, extra: int = MS_NOSUID | MS_NODEV) -> bool:
    """Make ``src`` appear at the same path under ``new_root``: a symlink is copied, anything else bound."""
    if not os.path.lexists(src):
        return False
    dst = new_root + src
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):
        if not os.path.lexists(dst):
            os.symlink(os.readlink(src), dst)
        return True
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    elif not os.path.exists(dst):
        with open(dst, "w"):
            pass
    _bind(src, dst)
    if readonly:
        _remount_readonly(dst, extra)
    return True


COPY_LIMIT = 512 * 1024  # an /etc entry up to this size is copied into the root's tmpfs rather than bound


def _tree_size(path: str) -> int:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, dirs, files in os.walk(path) for f in dirs + files)


def _copy_small(src: str, new_root: str) -> bool:
    """Copy a small /etc file or directory (symlinks kept as links) into the new root's tmpfs, which
    becomes read-only with the root. A copy is one mount fewer than a bind, in the worker's mount
    namespace and in every request's copy of it: each request copies and tears down those mounts
    under the kernel's global namespace lock. False (nothing done) where it is large, special, or gone."""
    if os.path.islink(src) or not os.path.exists(src):
        return False
    try:
        if _tree_size(src) > COPY_LIMIT:
            return False
        dst = new_root + src
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True)
        elif os.path.isfile(src):
            shutil.copy2(src, dst)
        else:
            return False
    except OSError:
        return False
    return True


def _pivot_root(new_root: str, put_old: str) -> None:
    nr = SYSCALLS.get(machine(), {}).get("pivot_root")
    if nr is None:
        raise OSError(errno.ENOSYS, "pivot_root: unknown architecture")
    _check(_libc.syscall(nr, new_root.encode(), put_old.encode()), "pivot_root")


def build_root(caps: Capabilities, expose: list[str], mount_points: list[str]) -> None:
    """Replace the filesystem view with an allowlist (in our new mount namespace, as its root).

    ``expose``: directories of the Python installation; ``mount_points``: empty directories to
    create for per-request mounts (``/sandbox``, ``/tmp``, ``/dev/shm``).
    """
    if not caps.mount_namespace:
        return
    new = NEW_ROOT
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
        done: list[str] = []
        for path in SYSTEM_DIRS + sorted(set(expose), key=len):
            if any(_under(path, d) for d in done):
                continue  # already inside a bound directory
            if _mirror(path, new):
                done.append(path)
        for name in ETC_FILES:
            _copy_small(f"/etc/{name}", new) or _mirror(f"/etc/{name}", new)
        os.makedirs(new + "/dev", exist_ok=True)
        for node in DEV_NODES:
            if os.path.exists(f"/dev/{node}"):
                _mirror(f"/dev/{node}", new, extra=MS_NOSUID | MS_NOEXEC)
        for name, target in DEV_LINKS.items():
            os.symlink(target, f"{new}/dev/{name}")
        for point in [*mount_points, "/proc"]:
            os.makedirs(new + point, exist_ok=True)
        if caps.pid_namespace:
            mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        caps.exposed = sorted(done)
        os.chdir(new)
        os.mkdir(".old")
        _pivot_root(".", ".old")
        os.chdir("/")
        umount("/.old")
        os.rmdir("/.old")
        caps.allowlisted_root = True
    except OSError as exc:
        caps.errors.append(f"allowlisted root: {exc}")
        return
    try:
        mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        caps.readonly_root = True
    except OSError as exc:
        caps.errors.append(f"read-only root: {exc}")
    if caps.ipc_namespace:
        try:
            sethostname("sandbox")
        except OSError:
            pass


PER_RUN_DIRS = ("/sandbox", "/tmp", "/dev/shm")  # each run gets fresh ones of its own, over the root's


def python_paths_hidden_per_run(paths: list[str] | None = None) -> list[tuple[str, str]]:
    """(path, directory) for each Python installation directory under a directory that every run
    replaces with its own: code run there would not see that installation (its modules fail to import)."""
    return [(p, d) for p in (python_paths() if paths is None else paths) for d in PER_RUN_DIRS if _under(p, d)]


def python_paths() -> list[str]:
    """Directories of the Python installation that the allowlisted root exposes (read-only)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    # only library directories: an editable install puts the repo itself on sys.path, and the
    # repo (with its .env) is exactly what we want hidden from sandboxed code
    libs = {p for p in sys.path if p and os.path.isdir(p) and ("-packages" in p or any(_under(p, q) for q in prefixes))}
    return sorted({os.path.realpath(p) for p in prefixes | libs})


UID_BLOCK = 1024  # uids a server claims at a time
UID_BLOCKS = 64  # ranges that servers on one host can claim: uid_base … uid_base + 64 × 1024
UID_LOCK_DIRS = ("/run/retool-sandbox", "/tmp/retool-sandbox")  # the first one that can be used


def claim_uids(base: int, count: int, lock_dirs: tuple[str, ...] = UID_LOCK_DIRS) -> tuple[int, list[int]]:
    """Claim ``count`` consecutive uids for this server's runs, none of which another server on this
    host holds: the first free range of blocks of :data:`UID_BLOCK` uids from ``base``. Returns its
    first uid and the lock descriptors that hold it (an ``flock`` on one file per block, which the
    kernel drops when the process exits, however it ends: a crashed server leaves nothing behind).
    Per-uid counters (RLIMIT_NPROC, pending signals, inotify instances, …) then never cross servers.
    A lock directory must be a directory (not a symlink) owned by this process's uid that no one else
    may write, and a lock file is never opened through a symlink. RuntimeError when no directory can
    hold the locks or every range is taken."""
    import fcntl
    import stat

    need = -(-count // UID_BLOCK)
    errors = []
    for lock_dir in lock_dirs:
        try:
            os.makedirs(lock_dir, mode=0o755, exist_ok=True)
            st = os.lstat(lock_dir)
        except OSError as exc:
            errors.append(f"{lock_dir}: {exc}")
            continue
        # a directory in /tmp may have been made first by anyone: only our own, which no one else may
        # write, is used (else its owner could hold every lock, or plant symlinks for us to follow)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            errors.append(f"{lock_dir}: not a directory of uid {os.geteuid()} that only it may write "
                          f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)})")
            continue
        for first in range(UID_BLOCKS - need + 1):
            held: list[int] = []
            try:
                for block in range(first, first + need):
                    fd = os.open(f"{lock_dir}/uids-{base + block * UID_BLOCK}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
                    held.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                for fd in held:
                    os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue  # another server holds a block of this range
                errors.append(f"{lock_dir}: {exc}")
                break
            return base + first * UID_BLOCK, held
        else:
            errors.append(f"all {UID_BLOCKS} ranges of {need * UID_BLOCK} uids from {base} are taken by other servers")
            break
    raise RuntimeError(f"cannot claim sandbox uids: {'; '.join(errors)}")


THREAD_ROOM = 1 << 30  # address space for a run's threads (8 MB stack each) and malloc arenas
MALLOC_ARENAS = 4
M_ARENA_MAX = -8  # mallopt


@dataclass
class Limits:
    # RLIMIT_DATA (private writable memory of one process: heap, anonymous mappings, thread stacks), only
    # where no memory cgroup bounds the run; None with one. Not RLIMIT_AS: address space counts what is
    # reserved, not used (each thread's malloc arena reserves 64 MB: twenty threads did not fit 1 GB)
    data_bytes: int | None
    # RLIMIT_AS, only where no memory cgroup bounds the run: RLIMIT_DATA does not count shared anonymous
    # memory, so an address-space limit backs it, generous (twice the budget, and THREAD_ROOM for the
    # threads' stacks and malloc arenas, over the warm interpreter's address space) since it counts
    # what is reserved, not used; malloc's arenas are capped at MALLOC_ARENAS per process under it
    address_bytes: int | None
    cpu_seconds: int  # RLIMIT_CPU's soft limit (SIGXCPU); the hard one (SIGKILL) a second later
    max_processes: int | None  # RLIMIT_NPROC; None where the slot's pids cgroup bounds the run instead
    max_file_bytes: int
    max_open_files: int


def apply_limits(limits: Limits) -> None:
    """In the request child, before running user code."""
    def setl(which: int, value: int, hard_value: int | None = None) -> None:
        _, hard = resource.getrlimit(which)
        cap = (lambda v: v) if hard == resource.RLIM_INFINITY else (lambda v: min(v, hard))
        resource.setrlimit(which, (cap(value), cap(value if hard_value is None else hard_value)))

    setl(resource.RLIMIT_CORE, 0)
    # soft below hard: the kernel sends SIGXCPU at the soft limit (a time limit, as the worker reports
    # it); at a hard limit equal to it, it would send SIGKILL at once, which reads as any other kill
    setl(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)
    if limits.max_processes is not None:  # a per-uid count: the pids cgroup, where there is one, is per run
        setl(resource.RLIMIT_NPROC, limits.max_processes)
    setl(resource.RLIMIT_FSIZE, limits.max_file_bytes)
    setl(resource.RLIMIT_NOFILE, limits.max_open_files)
    if limits.data_bytes:
        setl(resource.RLIMIT_DATA, limits.data_bytes)
    if limits.address_bytes:
        _libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)  # each arena reserves 64 MB (128 MB while made)
        setl(resource.RLIMIT_AS, limits.address_bytes)


def address_bytes() -> int:
    """This process's address space as RLIMIT_AS counts it (VmSize), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def data_bytes() -> int:
    """This process's private writable memory as RLIMIT_DATA counts it (VmData), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_bytes() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()
