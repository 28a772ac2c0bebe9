"""Sandbox throughput and latency: our server vs a fresh `python` subprocess per request.

    python scripts/lab/bench_sandbox.py [--workers N] [--quick]
    python scripts/lab/bench_sandbox.py --load 10000      # + the mixed load test (correctness, memory)
    python scripts/lab/bench_sandbox.py --workers 32 --fronts 4 --clients 4 --load 10000   # a 16-core host

One run, side by side, on (a) ``print(1+1)`` and (b) a sympy solve, at concurrency 1 and 64, and
(c) a 50 ms sleep at concurrency 64, bound by run time, not CPU: its rate against every worker busy
(workers / 50 ms) shows whether requests wait while workers idle.
Prints requests/s, p50/p99 latency and our/baseline ratios. The baseline runs the same code
with no isolation at all (``python -c``), so the ratio understates what isolation costs us. Under
each row, where our requests spent their time (mean ms, from the pool's ``/health`` statistics):
waiting for a worker, and the round trip to it split into the worker's stages (work area, cgroup
limits, fork into the namespaces, the run until its pid namespace is gone, output and fetch, clean-up)
and what is left for the pipes and the pool's event loop. A stage that grows from concurrency 1 to
64 while cores are idle is where requests wait on each other.

``--load N`` then sends N mixed requests (ordinary, erroring, timing out, hostile) at
concurrency 64, checks every answer, and samples the memory of the server's process tree as PSS.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import httpx

from recipe.retool.sandbox.timing import format_stages, stage_means_ms

REPO = Path(__file__).resolve().parents[2]

SNIPPETS = {
    "print": ("print(1+1)", "2\n"),
    "sympy": ("import sympy as sp\nx, y = sp.symbols('x y')\n"
              "print(sp.solve([x**2 + y**2 - 25, x - y - 1], [x, y]))", "[(-3, -4), (4, 3)]\n"),
    # bound by run time, not CPU: at best every worker busy, workers / SLEEP_S requests per second;
    # how close we come measures the dispatch (a worker idle while a request waits shows here)
    "sleep": ("import time\ntime.sleep(0.05)\nprint(1)", "1\n"),
}
SLEEP_S = 0.05


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def drive(call, n: int, concurrency: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one():
        async with sem:
            t = time.perf_counter()
            await call()
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0), lat


def _client_main(url: str, code: str, expect: str, n: int, conc: int, barrier, results) -> None:
    """One load-generating process (``--clients``): warm up, wait for the others, drive, report."""
    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc + 8)) as session:
            async def call() -> None:
                async with session.post(url + "/run_code", json={"code": code, "language": "python"}) as resp:
                    r = await resp.json()
                assert r["run_result"]["stdout"] == expect, r

            await drive(call, 2 * conc, conc)  # open and warm this client's connections
            barrier.wait()
            t0 = time.time()
            _, lat = await drive(call, n, conc)
            results.put((t0, time.time(), lat))

    asyncio.run(main())


async def drive_clients(url: str, code: str, expect: str, n: int, conc: int, clients: int) -> tuple[float, list[float]]:
    """Like ``drive`` for our server, from ``clients`` processes at ``conc / clients`` each: one Python
    client process tops out at a few thousand requests/s, which a many-core server can exceed."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=(url, code, expect, n // clients, conc // clients, barrier, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, barrier.wait)
    got = [await loop.run_in_executor(None, results.get) for _ in procs]
    for p in procs:
        p.join()
    lat = [x for _, _, lats in got for x in lats]
    return len(lat) / (max(t1 for _, t1, _ in got) - min(t0 for t0, _, _ in got)), lat


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (the server, its fronts, workers and their children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def tree_pss_mb(pid: int) -> float:
    """PSS of the server's process tree, in MiB: each page shared by n processes counts 1/n in each, so
    the copy-on-write pages the workers and their children share with each other are counted once
    (summed RSS counts them once per process and overstates memory many times over)."""
    total_kb = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
        except OSError:
            continue  # exited meanwhile
    return total_kb / 1024


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]  # guest time is already inside user/nice
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(start: tuple[int, int]) -> float:
    """Share of the host's CPU time that was busy since ``start`` (server, clients and all)."""
    busy, total = cpu_times()
    return (busy - start[0]) / max(1, total - start[1])


async def pool_stats(url: str) -> dict:
    """The pool's cumulative statistics (``/health``; every front reports the one pool) and how many
    requests each front brought."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(url + "/health") as resp:
            body = await resp.json()
    return {**(body.get("stats") or {}), "requests_by_front": body.get("requests_by_front") or []}


async def bench(url: str, quick: bool, workers: int, clients: int = 1) -> None:
    # aiohttp as the driver: it costs the 2-core machine less CPU than httpx, so the figures
    # measure the server rather than the load generator
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as session:
        async def ours(code: str, expect: str):
            async with session.post(url + "/run_code", json={"code": code, "language": "python"}) as resp:
                r = await resp.json()
            assert r["run_result"]["stdout"] == expect, r

        async def baseline(code: str, expect: str):
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            assert out.decode() == expect

        scale = 0.25 if quick else 1.0
        plan = {  # (snippet, concurrency): (our requests, baseline requests)
            ("print", 1): (200, 30), ("print", 64): (2000, 200),
            ("sympy", 1): (100, 8), ("sympy", 64): (1000, 64),
            ("sleep", 64): (800, 0),  # no baseline: fresh processes that sleep are not bounded by a pool
        }
        print(f"{'snippet':8s} {'conc':>4s} | {'ours req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} | "
              f"{'base req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} | {'ratio':>6s} | host CPU busy (ours)")
        for (name, conc), (n_ours, n_base) in plan.items():
            code, expect = SNIPPETS[name]
            run_ours = lambda c=code, e=expect: ours(c, e)  # noqa: E731
            run_base = lambda c=code, e=expect: baseline(c, e)  # noqa: E731
            await drive(run_ours, 8, 8)  # warm connections
            stats0 = await pool_stats(url)
            cpu0 = cpu_times()
            if clients > 1 and conc >= clients:
                tp_o, lat_o = await drive_clients(url, code, expect, max(8, int(n_ours * scale)), conc, clients)
            else:
                tp_o, lat_o = await drive(run_ours, max(8, int(n_ours * scale)), conc)
            busy = busy_since(cpu0)
            stages = stage_means_ms(stats0, await pool_stats(url))
            if n_base:
                tp_b, lat_b = await drive(run_base, max(4, int(n_base * scale)), conc)
                base = f"{tp_b:10.1f} {pct(lat_b, .5)*1e3:8.1f} {pct(lat_b, .99)*1e3:8.1f} | {tp_o / tp_b:5.1f}x"
            else:
                base = f"{'-':>10s} {'-':>8s} {'-':>8s} | {'-':>6s}"
            print(f"{name:8s} {conc:4d} | {tp_o:10.1f} {pct(lat_o, .5)*1e3:8.1f} {pct(lat_o, .99)*1e3:8.1f} | "
                  f"{base} | {busy:6.0%} of {os.cpu_count()} cores")
            if stages:
                print(format_stages(stages))
            if name == "sleep":
                ideal = min(conc, workers) / SLEEP_S
                print(f"{'':14s}run-bound: {tp_o / ideal:.0%} of the pool's ideal ({min(conc, workers)} workers busy: {ideal:.0f} req/s)")


LOAD_KINDS = {
    # kind: (weight, code, run_timeout, check(body) -> bool)
    "ordinary": (70, "import math\nprint(math.comb({i} % 50 + 10, 5))", 5,
                 lambda b, i: b["status"] == "Success" and b["run_result"]["stdout"] == f"{__import__('math').comb(i % 50 + 10, 5)}\n"),
    "error": (12, "raise RuntimeError('e{i}')", 5,
              lambda b, i: b["status"] == "Failed" and f"RuntimeError: e{i}" in b["run_result"]["stderr"]),
    "timeout": (5, "while True: pass", 0.3,
                lambda b, i: b["status"] == "Failed" and b["run_result"]["status"] == "TimeLimitExceeded"),
    # over the request's budget: MemoryError where only rlimits bound it (--allow-unsafe), the
    # documented kill with a note where its cgroup does (a cgroup bounds memory by use)
    "memory": (4, "x = bytearray(4 * 1024**3)", 5,
               lambda b, i: b["status"] == "Failed" and ("MemoryError" in b["run_result"]["stderr"]
                                                         or "memory budget" in b["run_result"]["stderr"])),
    "forkbomb": (3, "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", 0.5,
                 lambda b, i: b["status"] == "Failed"),
    "flood": (3, "import sys\nsys.stdout.write('y' * 5_000_000)\nprint()", 5,
              lambda b, i: b["status"] == "Success" and "output truncated" in b["run_result"]["stdout"]),
    "escape": (3, "import os\nos.fork() or os.setsid() or __import__('time').sleep(30)\nprint('ok{i}')", 5,
               lambda b, i: b["status"] == "Success" and f"ok{i}" in b["run_result"]["stdout"]),
}


async def load_test(url: str, n: int, server_pid: int, concurrency: int = 64) -> bool:
    rng = random.Random(0)
    kinds = rng.choices(list(LOAD_KINDS), weights=[k[0] for k in LOAD_KINDS.values()], k=n)
    wrong: list[tuple[int, str, str]] = []
    lost = 0
    mem: list[float] = [tree_pss_mb(server_pid)]
    done = 0
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int, kind: str):
            nonlocal lost, done
            _, code, timeout, check = LOAD_KINDS[kind]
            async with sem:
                try:
                    r = await client.post(url + "/run_code", json={"code": code.replace("{i}", str(i)),
                                                                    "language": "python", "run_timeout": timeout})
                    body = r.json()
                    if not check(body, i):
                        wrong.append((i, kind, str(body)[:300]))
                except Exception as exc:  # noqa: BLE001 - any lost answer counts
                    lost += 1
                    wrong.append((i, kind, repr(exc)))
            done += 1
            if done % max(1, n // 10) == 0:
                mem.append(tree_pss_mb(server_pid))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds)))
        elapsed = time.perf_counter() - t0
    mem.append(tree_pss_mb(server_pid))
    counts = {k: kinds.count(k) for k in LOAD_KINDS}
    print(f"\nload test: {n} requests at concurrency {concurrency} in {elapsed:.1f}s ({n / elapsed:.0f} req/s), mix {counts}")
    print(f"  lost: {lost}, wrong: {len(wrong) - lost}")
    by_kind = {k: sum(1 for _, kind, _ in wrong if kind == k) for k in LOAD_KINDS}
    if wrong:
        print(f"  wrong by kind: { {k: v for k, v in by_kind.items() if v} }")
    for kind in LOAD_KINDS:  # the first two of each kind
        for item in [w for w in wrong if w[1] == kind][:2]:
            print("   ", item)
    print(f"  server+workers PSS MiB over the run: {', '.join(f'{m:.0f}' for m in mem)} "
          f"(first→last {mem[0]:.0f}→{mem[-1]:.0f}, max {max(mem):.0f}, median {statistics.median(mem):.0f})")
    return not wrong


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=None, help="sandbox workers (default: the server's)")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--fronts", type=int, default=None, help="HTTP front processes (default: the server's)")
    p.add_argument("--allow-unsafe", action="store_true",
                   help="pass --allow-unsafe to the server (a host without a writable cgroup; figures then "
                        "lack the per-request cgroup's cost)")
    p.add_argument("--clients", type=int, default=1,
                   help="load-generating processes for our server at concurrency > 1 (one Python client tops "
                        "out at a few thousand req/s; use 4 on a 16-core host)")
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument("--load", type=int, default=0, help="also run the mixed load test with this many requests")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--url", help="measure a server already running there instead of starting one (e.g. one "
                                 "started in a cgroup of its own); --server-pid then names it for the memory figures, and --workers/--fronts "
                                 "only label the output (pass the server's)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid (its process tree's PSS is sampled)")
    args = p.parse_args()
    if args.url and args.load and not args.server_pid:
        p.error("--load with --url needs --server-pid (the memory of the server's process tree is sampled)")
    from recipe.retool.sandbox.pool import SandboxConfig

    workers = args.workers or SandboxConfig().workers
    from recipe.retool.processes import LocalSandbox

    extra = ["--fronts", str(args.fronts)] if args.fronts else []
    extra += ["--allow-unsafe"] if args.allow_unsafe else []
    if args.url:
        sandbox, url, server_pid = None, args.url.rstrip("/"), args.server_pid
    else:
        sandbox = LocalSandbox(workers=workers, cwd=str(REPO), port=args.port, extra_args=extra).wait(300)
        url, server_pid = sandbox.url, sandbox.proc.pid
    ok = True
    try:
        from recipe.retool.sandbox.server import default_fronts

        fronts = args.fronts or min(default_fronts(), workers)
        print(f"{os.cpu_count()} cores, {workers} sandbox workers, {fronts} HTTP fronts, python {sys.version.split()[0]}, "
              f"load average {os.getloadavg()[0]:.2f}")
        if not args.skip_bench:
            asyncio.run(bench(url, args.quick, workers, args.clients))
        if args.load:
            ok = asyncio.run(load_test(url, args.load, server_pid))
    finally:
        if sandbox is not None:
            sandbox.stop()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
