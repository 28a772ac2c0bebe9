"""A small seccomp filter for sandboxed children: deny the kernel interfaces a snippet has no use for.

A classic-BPF program installed with ``prctl(PR_SET_SECCOMP)`` after ``no_new_privs`` (no libseccomp
needed, so nothing beyond Python and the kernel). It is a *denylist* of calls, plus an allowlist of
socket families, on top of the other layers (uid drop, namespaces, rlimits, cgroups), aimed at what
those layers leave open:

- kernel keyrings (``add_key``, ``keyctl``, ``request_key``): the user keyring is per uid and
  outlives a request, and even the server;
- new namespaces and mounts (``unshare``, ``setns``, ``clone`` with namespace flags, ``clone3``,
  ``mount`` and the new mount API, ``pivot_root``, ``chroot``): an unprivileged user namespace
  would hand the snippet every capability inside it;
- large attack surfaces a math snippet never needs: ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*`` (whose operations bypass seccomp), module and kexec loading;
- socket address families other than ``AF_UNIX``, ``AF_INET`` and ``AF_INET6`` (an allowlist on the
  first argument of ``socket`` and ``socketpair``): the network namespace does not isolate every
  family. ``AF_VSOCK`` reaches the hypervisor and other VMs whatever the namespace; ``AF_NETLINK``,
  ``AF_PACKET``, ``AF_ALG``, Bluetooth, CAN, TIPC, RDS, XDP and the rest are kernel surface no
  snippet needs. ``AF_UNIX`` is what ``socketpair``, ``asyncio`` and ``multiprocessing`` use (the
  run's root holds no host socket to connect to); ``AF_INET``/``AF_INET6`` sockets can be made, as
  ordinary libraries expect, but the namespace has no interface up, so they reach nothing.

``clone3`` answers ``ENOSYS`` (its flags sit in memory a filter cannot read; glibc then falls back
to ``clone``, whose flags are checked), a refused socket family ``EAFNOSUPPORT``, the rest ``EPERM``.
Foreign system-call ABIs (x32, 32-bit compat) kill the process. Only x86_64 and aarch64 are known;
elsewhere :func:`install` raises and the worker reports seccomp as missing.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# audit architectures and the numbers of the calls we deny, per architecture
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_COMMON_NEW = {  # numbers shared by every architecture since Linux 5.1
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}
SYSCALLS = {
    "x86_64": {
        "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "setns": 308, "mount": 165,
        "umount2": 166, "pivot_root": 155, "chroot": 161, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "acct": 163, "swapon": 167, "swapoff": 168,
        "open_by_handle_at": 304, "clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, **_COMMON_NEW,
    },
    "aarch64": {
        "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97, "setns": 268, "mount": 40,
        "umount2": 39, "pivot_root": 41, "chroot": 51, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "acct": 89, "swapon": 224, "swapoff": 225,
        "open_by_handle_at": 265, "clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, **_COMMON_NEW,
    },
}
CHECKED = ("clone", "clone3", "socket", "socketpair")  # allowed or denied by their arguments
DENIED = [name for name in SYSCALLS["x86_64"] if name not in CHECKED]
# the socket address families a run may use (socket's and socketpair's first argument)
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (+ CLONE_NEWTIME 0x80)
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
X32_SYSCALL_BIT = 0x40000000

# classic BPF opcodes
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data offsets: nr (int), arch (u32), instruction_pointer (u64), args[6] (u64)
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def build_program(arch: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; raises for an architecture we do not know."""
    arch = arch or machine()
    if arch not in SYSCALLS or struct.calcsize("P") != 8 or struct.pack("=I", 1)[0] != 1:
        raise OSError(errno.ENOSYS, f"no seccomp filter for architecture {arch!r}")
    nrs = SYSCALLS[arch]
    deny = sorted({nrs[name] for name in DENIED})
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH[arch]),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch == "x86_64":  # x32 calls share the architecture token; refuse them outright
        prog += [(_JGE_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, RET_KILL_PROCESS)]
    for nr in deny:
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, RET_ERRNO | errno.EPERM)]
    prog += [(_JEQ_K, 0, 1, nrs["clone3"]), (_RET_K, 0, 0, RET_ERRNO | errno.ENOSYS)]
    # socket/socketpair: the family (the low word of the first argument, an int to the kernel) must be
    # allowed; a jump to the final ALLOW of the block for each allowed one
    fams = ALLOWED_FAMILIES
    block = [(_LD_W_ABS, 0, 0, _OFF_ARG0_LO)]
    block += [(_JEQ_K, len(fams) - i, 0, fam) for i, fam in enumerate(fams)]
    block += [(_RET_K, 0, 0, RET_ERRNO | errno.EAFNOSUPPORT), (_RET_K, 0, 0, RET_ALLOW)]
    prog += [(_JEQ_K, 1, 0, nrs["socket"]), (_JEQ_K, 0, len(block), nrs["socketpair"]), *block]
    prog += [
        (_JEQ_K, 0, 3, nrs["clone"]),
        (_LD_W_ABS, 0, 0, _OFF_ARG0_LO),  # clone's flags: the low word of its first argument
        (_JSET_K, 0, 1, CLONE_NS_FLAGS),
        (_RET_K, 0, 0, RET_ERRNO | errno.EPERM),
        (_RET_K, 0, 0, RET_ALLOW),
    ]
    return prog


_compiled: dict[str, tuple[_SockFprog, ctypes.Array]] = {}


def compile_filter(arch: str | None = None) -> _SockFprog:
    """The filter as the kernel takes it; built once per process (a worker builds it before forking,
    so each request child only makes the one ``prctl`` call)."""
    arch = arch or machine()
    if arch not in _compiled:
        prog = build_program(arch)
        array = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
        _compiled[arch] = (_SockFprog(len(prog), array), array)  # keep the array alive with the header
    return _compiled[arch][0]


def install(arch: str | None = None) -> None:
    """Install the filter on the calling thread (no_new_privs must already be set). Irreversible."""
    fprog = compile_filter(arch)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {errno.errorcode.get(err, err)}")
