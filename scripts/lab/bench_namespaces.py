"""Do the sandbox's per-request kernel operations scale with cores? (root, Linux)

    sudo python scripts/lab/bench_namespaces.py [--procs 1 2 4 8 16] [--seconds 3]

Each request to our sandbox costs some kernel work besides running the snippet: the manager mounts
and detaches a tmpfs work area, the zygote forks the child into a new pid namespace, and the child
takes new mount and ipc namespaces, binds /tmp and /dev/shm and mounts /proc, then exits (tearing
its namespaces down). This script repeats those operations in P independent loops (P processes,
each in a private mount namespace of its own so nothing touches the host's mounts) and prints the
total operations per second for each P, one level of work at a time:

    fork        fork + exit + wait (the floor)
    pidns       + the child is pid 1 of a new pid namespace
    mntns       + the child unshares mount and ipc namespaces and makes / private
    binds       + the child's two bind mounts and /proc
    tmpfs       + the parent mounts and detaches a tmpfs work area around each child (the full set)

If a level's rate stops growing with P while the cores are idle, that operation is serialised by
the kernel, and it caps the sandbox's request rate on that machine whatever the HTTP front does.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipe.retool.sandbox import isolation  # noqa: E402

LEVELS = ("fork", "pidns", "mntns", "binds", "tmpfs")


def _child(level: int, area: str) -> None:
    try:
        if level >= LEVELS.index("mntns"):
            isolation.unshare(isolation.CLONE_NEWNS | isolation.CLONE_NEWIPC)
            isolation.mount(None, "/", None, isolation.MS_REC | isolation.MS_PRIVATE)
        if level >= LEVELS.index("binds"):
            isolation.mount(f"{area}/tmp", f"{area}/mnt1", None, isolation.MS_BIND)
            isolation.mount(f"{area}/shm", f"{area}/mnt2", None, isolation.MS_BIND)
            isolation.mount("proc", f"{area}/proc", "proc", isolation.MS_NOSUID | isolation.MS_NODEV | isolation.MS_NOEXEC)
    except OSError:
        os._exit(1)
    os._exit(0)


def _loop(level: int, seconds: float, start: mp.Event, out: mp.Queue) -> None:
    isolation.unshare(isolation.CLONE_NEWNS)  # our mounts stay in this process's own namespace
    isolation.mount(None, "/", None, isolation.MS_REC | isolation.MS_PRIVATE)
    base = tempfile.mkdtemp(prefix="bench-ns-")
    area = f"{base}/area"
    os.mkdir(area)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)

    def prepare() -> None:
        if level >= LEVELS.index("tmpfs"):
            isolation.mount("tmpfs", area, "tmpfs", isolation.MS_NOSUID | isolation.MS_NODEV, "size=8m,mode=0755")
        for sub in ("tmp", "shm", "mnt1", "mnt2", "proc"):
            os.makedirs(f"{area}/{sub}", exist_ok=True)

    def cleanup() -> None:
        if level >= LEVELS.index("tmpfs"):
            isolation.umount(area)

    start.wait()
    n, failures, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        prepare()
        if level >= LEVELS.index("pidns"):
            isolation.unshare(isolation.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            _child(level, area)
        if level >= LEVELS.index("pidns"):
            isolation.setns(own_pidns, isolation.CLONE_NEWPID)
        _, status = os.waitpid(pid, 0)
        failures += status != 0
        cleanup()
        n += 1
    out.put((n, failures, time.perf_counter() - t0))
    shutil.rmtree(base, ignore_errors=True)


def measure(level: int, procs: int, seconds: float) -> tuple[float, int]:
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_loop, args=(level, seconds, start, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    time.sleep(0.2)
    start.set()
    results = [out.get(timeout=seconds + 60) for _ in workers]
    for w in workers:
        w.join()
    return sum(n / dt for n, _, dt in results), sum(f for _, f, _ in results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default: %(default)s)")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("needs root (mounts and namespaces, as the sandbox's full isolation does)")
    print(f"cores: {os.cpu_count()}, kernel: {os.uname().release}")
    print("level   " + "".join(f"{f'P={n}':>10}" for n in args.procs) + "   (operations/s, all loops together)")
    for name in args.levels:
        rates = []
        for n in args.procs:
            rate, failures = measure(LEVELS.index(name), n, args.seconds)
            rates.append(f"{rate:10.0f}" + ("!" if failures else ""))
        print(f"{name:<8}" + "".join(rates), flush=True)
    print("(! = some children failed their mounts)")


if __name__ == "__main__":
    main()
