"""recipe.retool.sandbox.pool: a worker that dies is replaced; requests never hang or get lost."""

from __future__ import annotations

import asyncio
import os
import signal

from recipe.retool.sandbox.pool import SandboxConfig, WorkerPool


async def test_dead_worker_is_answered_as_sandbox_error_and_replaced():
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, grace_s=2.0))
    await pool.start()
    try:
        [worker] = pool._workers.values()
        os.killpg(worker.proc.pid, signal.SIGKILL)  # the worker dies between requests
        resp = await pool.run({"code": "print(1)", "run_timeout": 5})
        assert resp["status"] == "SandboxError" and "died" in resp["message"]
        for _ in range(3):  # the replacement serves the next requests
            ok = await asyncio.wait_for(pool.run({"code": "print(2)", "run_timeout": 5}), 60)
            assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "2\n"
        assert pool.stats["worker_restarts"] == 1
    finally:
        await pool.close()


async def test_recycling_keeps_serving():
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, recycle_after=2))
    await pool.start()
    try:
        outs = [await asyncio.wait_for(pool.run({"code": f"print({i})", "run_timeout": 5}), 60) for i in range(5)]
        assert [o["run_result"]["stdout"] for o in outs] == [f"{i}\n" for i in range(5)]
        assert pool.stats["worker_restarts"] == 2
    finally:
        await pool.close()


async def test_refuses_to_start_without_isolation_unless_allowed():
    pool = WorkerPool(SandboxConfig(workers=1, preload=[], warmup=False, isolate=False))
    try:
        await pool.start()
        raise AssertionError("should have refused")
    except RuntimeError as err:
        assert "refusing to serve" in str(err) and "--allow-unsafe" in str(err)
    unsafe = WorkerPool(SandboxConfig(workers=1, preload=[], warmup=False, isolate=False, allow_unsafe=True))
    await unsafe.start()
    try:
        resp = await unsafe.run({"code": "print(3)", "run_timeout": 5})
        assert resp["run_result"]["stdout"] == "3\n"
    finally:
        await unsafe.close()


async def test_health_reports_a_missing_worker_until_it_is_replaced():
    """Hardening class 2: health must say when the pool is short of a worker, not always "ok"."""
    pool = WorkerPool(SandboxConfig(workers=2, preload=["math"], warmup=False, grace_s=2.0))
    await pool.start()
    try:
        assert pool.health()["status"] == "ok" and pool.health()["live"] == 2
        worker = pool._workers[0]
        os.killpg(worker.proc.pid, signal.SIGKILL)
        for _ in range(2):  # one of these lands on the dead worker
            await asyncio.wait_for(pool.run({"code": "print(1)", "run_timeout": 5}), 30)
        health = pool.health()
        assert health["status"] == "degraded" and health["live"] == 1 and "worker 0" in health["problems"][-1]
        for _ in range(600):
            if pool.health()["status"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert pool.health()["live"] == 2
    finally:
        await pool.close()


async def test_replacement_workers_are_checked_before_they_serve():
    """Hardening class 8: a replacement that comes up without isolation must never run a request."""
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, grace_s=2.0))
    await pool.start()
    try:
        pool.config.isolate = False  # whatever the cause, the next worker will come up unconfined
        [worker] = pool._workers.values()
        os.killpg(worker.proc.pid, signal.SIGKILL)
        first = await asyncio.wait_for(pool.run({"code": "print(1)", "run_timeout": 5}), 30)
        assert first["status"] == "SandboxError"
        second = await asyncio.wait_for(pool.run({"code": "print('ran unconfined')", "run_timeout": 5}), 30)
        assert second["status"] == "SandboxError" and "isolation" in second["message"], second
        assert pool.health()["status"] == "degraded"
        assert any("isolation" in p for p in pool.health()["problems"])
    finally:
        await pool.close()


async def test_every_worker_passes_the_probe_and_runs_confined():
    """What the start-up probe checks, seen from a request: alone in its pid namespace, seccomp on, no
    capabilities, its slot's cgroup, no host paths."""
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False))
    await pool.start()
    try:
        from recipe.retool.sandbox.pool import PROBE, probe_codes, probe_failures, slot_cgroups

        codes = probe_codes(["math", "json"])
        assert codes == [PROBE]  # no third-party preload: one interpreter
        resp = await pool.run({"code": PROBE, "run_timeout": 10})
        cgroups = slot_cgroups(pool.cgroup_plan, 0)
        assert probe_failures(resp, pool.capabilities, cgroups) == [], resp
        if cgroups:  # a run of slot 0 claimed for slot 1 is caught
            assert any("slot's cgroup" in p for p in probe_failures(resp, pool.capabilities, slot_cgroups(pool.cgroup_plan, 1)))
    finally:
        await pool.close()


async def test_the_probe_runs_through_both_warm_interpreters():
    """With a third-party preload each worker has a lean and a full interpreter; the start-up probe
    checks runs forked from each (a lean-only probe left the full one, which runs numpy and sympy
    code, unchecked)."""
    from recipe.retool.sandbox.pool import PROBE, probe_codes, probe_failures, slot_cgroups
    from recipe.retool.sandbox.worker import stdlib_only

    codes = probe_codes(["math", "numpy"])
    assert len(codes) == 2 and stdlib_only(codes[0], ["numpy"]) and not stdlib_only(codes[1], ["numpy"])
    assert codes[0] == PROBE
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math", "numpy"], warmup=False))
    await pool.start()
    try:
        for code in codes:
            resp = await pool.run({"code": code + "import sys\nprint('num' + 'py' in sys.modules, file=sys.stderr)",
                                   "run_timeout": 10})
            assert probe_failures(resp, pool.capabilities, slot_cgroups(pool.cgroup_plan, 0)) == [], resp
            assert resp["run_result"]["stderr"].strip() == str(code != PROBE), resp
    finally:
        await pool.close()


async def test_writing_input_files_counts_against_the_run_deadline():
    """A request's input files are written within its run_timeout: thirty files each 2,000 directories
    deep (past the HTTP front's limits, which only a caller of the pool itself can send) are cut off at
    the deadline and answered TimeLimitExceeded, instead of keeping the worker busy until the pool gives
    up on it and replaces it."""
    import time

    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, grace_s=2.0))
    await pool.start()
    try:
        deep = "/".join(["d"] * 2000)
        files = {f"{i}/{deep}/f": "" for i in range(30)}
        t = time.monotonic()
        resp = await asyncio.wait_for(pool.run({"code": "print(1)", "run_timeout": 0.1, "files": files}), 60)
        took = time.monotonic() - t
        assert resp["status"] == "Failed" and resp["run_result"]["status"] == "TimeLimitExceeded", resp
        # the old code answered only when the pool gave up on the worker (run_timeout + grace_s, 2.1 s
        # at least) and replaced it, which the restart count below also catches
        assert "input files" in resp["message"] and took < 2.0, (took, resp["message"])
        ok = await asyncio.wait_for(pool.run({"code": "print(2)", "run_timeout": 5}), 30)
        assert ok["run_result"]["stdout"] == "2\n"
        assert pool.stats["worker_restarts"] == 0 and pool.health()["status"] == "ok", pool.health()
    finally:
        await pool.close()


def test_uid_ranges_are_claimed_by_one_server_at_a_time(tmp_path):
    """Servers on one host take disjoint uid ranges (a lock per block of uids, held while the server
    lives); a range whose holder is gone is free again."""
    from recipe.retool.sandbox.isolation import UID_BLOCK, claim_uids

    (tmp_path / "a-file").write_text("")
    dirs = (str(tmp_path / "a-file" / "locks"), str(tmp_path))  # the first cannot be made: the next one is used
    a, held_a = claim_uids(1000, 3, dirs)
    b, held_b = claim_uids(1000, UID_BLOCK + 1, dirs)  # two blocks, after the one taken
    assert (a, b) == (1000, 1000 + UID_BLOCK)
    for fd in held_a:
        os.close(fd)
    c, held_c = claim_uids(1000, 5, dirs)
    assert c == 1000
    for fd in held_b + held_c:
        os.close(fd)


def test_uid_locks_are_not_taken_in_a_directory_another_user_could_have_made(tmp_path):
    """The lock directory falls back to /tmp, where any local user can make it first: root then created
    lock files through that user's symlinks, or found every lock held. A directory that is not the
    server's own or that others may write is refused, and a lock file that is a symlink is not followed."""
    from recipe.retool.sandbox.isolation import claim_uids

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp itself: anyone may add files
    try:
        held = claim_uids(1000, 3, (str(shared),))[1]
        for fd in held:
            os.close(fd)
        raise AssertionError("locks were taken in a world-writable directory")
    except RuntimeError as exc:
        assert "shared" in str(exc), exc
    linked = tmp_path / "linked"
    linked.mkdir(mode=0o755)
    target = tmp_path / "elsewhere"
    (linked / "uids-1000.lock").symlink_to(target)
    try:
        held = claim_uids(1000, 3, (str(linked),))[1]
        for fd in held:
            os.close(fd)
        raise AssertionError("a symlinked lock file was followed")
    except RuntimeError:
        pass
    assert not target.exists()
    (tmp_path / "dir-link").symlink_to(tmp_path / "own")
    (tmp_path / "own").mkdir(mode=0o755)
    try:
        claim_uids(1000, 3, (str(tmp_path / "dir-link"),))
        raise AssertionError("a symlinked lock directory was used")
    except RuntimeError:
        pass
    own = tmp_path / "private"
    first, held = claim_uids(1000, 3, (str(own),))  # made here, the server's own, 0755: used
    assert first == 1000 and (own / "uids-1000.lock").is_file()
    for fd in held:
        os.close(fd)


def test_the_seccomp_start_up_check_probes_a_family_every_kernel_has(monkeypatch):
    """The start-up check probed the socket filter with AF_VSOCK, which answers EAFNOSUPPORT anyway on a
    host without the vsock module: a filter that let other families through still passed. It probes
    AF_NETLINK, which every Linux kernel has, so a filter that allows it fails the check."""
    from recipe.retool.sandbox import seccomp, worker

    monkeypatch.setattr(seccomp, "_compiled", {})
    assert worker._seccomp_works()
    monkeypatch.setattr(seccomp, "_compiled", {})
    monkeypatch.setattr(seccomp, "ALLOWED_FAMILIES", (*seccomp.ALLOWED_FAMILIES, 16))  # + AF_NETLINK
    assert not worker._seccomp_works()


async def test_without_a_cgroup_a_shared_mapping_is_bounded_too():
    """--allow-unsafe without a memory cgroup: RLIMIT_DATA does not count shared anonymous memory, so
    with a 1 GiB budget a 4 GiB shared mapping was made (and could be filled). A generous address-space
    limit (twice the budget and room for threads, over the warm interpreter) stands behind it there."""
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, cgroups=False, allow_unsafe=True))
    await pool.start()
    try:
        code = ("import mmap\ntry:\n    m = mmap.mmap(-1, 4 << 30)\n    print('mapped')\n"
                "except (OSError, MemoryError) as exc:\n    print('refused', type(exc).__name__)")
        resp = await pool.run({"code": code, "run_timeout": 10, "memory_limit_MB": 1024})
        assert resp["run_result"]["stdout"].startswith("refused"), resp["run_result"]
        fits = ("import mmap\nm = mmap.mmap(-1, 512 << 20)\nm[::4096] = b'x' * (128 << 10)\nprint('ok')")
        resp = await pool.run({"code": fits, "run_timeout": 10, "memory_limit_MB": 1024})
        assert resp["run_result"]["stdout"] == "ok\n", resp["run_result"]
    finally:
        await pool.close()


async def test_without_a_cgroup_memory_is_bounded_per_process_by_what_is_used():
    """--allow-unsafe without a memory cgroup: each process's private writable memory is bounded
    (RLIMIT_DATA), not its address space, so threads still start and an allocation past the budget is a
    MemoryError."""
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False, cgroups=False, allow_unsafe=True))
    await pool.start()
    try:
        bomb = await pool.run({"code": "x = bytearray(2 * 1024**3)\nprint('allocated')", "run_timeout": 10,
                               "memory_limit_MB": 256})
        assert bomb["status"] == "Failed" and "MemoryError" in bomb["run_result"]["stderr"], bomb["run_result"]
        threads = ("import concurrent.futures, threading\nbarrier = threading.Barrier(20, timeout=5)\n"
                   "with concurrent.futures.ThreadPoolExecutor(max_workers=20) as ex:\n"
                   "    print(len(list(ex.map(lambda i: barrier.wait(), range(20)))))")
        ok = await pool.run({"code": threads, "run_timeout": 20})
        assert ok["status"] == "Success" and ok["run_result"]["stdout"] == "20\n", ok["run_result"]
    finally:
        await pool.close()


# ---- the cgroup v2 layout of a server (a temporary tree stands in for the mount) ----


def _fake_v2(tmp_path, monkeypatch, procs: list[int], controllers: str = "cpu memory io"):
    from recipe.retool.sandbox import cgroup

    mnt = tmp_path / "cg"
    here = mnt / "job"
    here.mkdir(parents=True)
    (here / "cgroup.controllers").write_text(controllers + "\n")
    (here / "cgroup.subtree_control").write_text("")
    (here / "cgroup.procs").write_text("".join(f"{p}\n" for p in procs))
    monkeypatch.setattr(cgroup, "_mounts", lambda: [("/", str(mnt), "cgroup2", "rw")])
    monkeypatch.setattr(cgroup, "_own_paths", lambda: {"": "/job"})
    stale = here / f"{cgroup.PREFIX}999999999"  # a server of ours that is gone
    (stale / "slot0").mkdir(parents=True)
    return cgroup, here, stale


def test_prepare_enables_memory_sweeps_stale_servers_and_makes_the_servers_directory(tmp_path, monkeypatch):
    """The pool's process (the only one, however many fronts) enables the controllers its cgroup
    offers, removes what a dead server of ours left, and makes its own directory for the slots."""
    cgroup, here, stale = _fake_v2(tmp_path, monkeypatch, [os.getpid()])
    plan = cgroup.prepare(name=f"{cgroup.PREFIX}101")
    base = here / f"{cgroup.PREFIX}101"
    assert plan.version == 2 and plan.dirs == {"unified": str(base)}
    assert (here / "cgroup.subtree_control").read_text() == "+memory"  # pids absent here: memory only
    assert (base / "cgroup.subtree_control").read_text() == "+memory"
    assert not stale.exists()


def test_prepare_needs_memory(tmp_path, monkeypatch):
    cgroup, here, _ = _fake_v2(tmp_path, monkeypatch, [os.getpid()], controllers="cpu io")
    monkeypatch.setattr(cgroup, "_prepare_v1", lambda *a: (_ for _ in ()).throw(cgroup.CgroupUnavailable("no v1")))
    try:
        cgroup.prepare(name=f"{cgroup.PREFIX}102")
        raise AssertionError("should have refused")
    except cgroup.CgroupUnavailable as exc:
        assert "not memory" in str(exc) and "no v1" in str(exc)


def test_cgroup_removal_waits_for_a_busy_slot(tmp_path, monkeypatch):
    """rmdir of a cgroup whose last processes are being reaped answers EBUSY for a moment: retried."""
    import errno

    from recipe.retool.sandbox import cgroup

    (tmp_path / "base" / "slot0").mkdir(parents=True)
    real, busy = os.rmdir, {"left": 3}

    def rmdir(path):
        if path.endswith("slot0") and busy["left"]:
            busy["left"] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        real(path)

    monkeypatch.setattr(cgroup.os, "rmdir", rmdir)
    cgroup._remove_tree(str(tmp_path / "base"))
    assert not (tmp_path / "base").exists() and busy["left"] == 0
    (tmp_path / "stale" / "slot0").mkdir(parents=True)
    busy["left"] = 3
    cgroup._remove_tree(str(tmp_path / "stale"), wait_s=0)  # a sweep does not wait
    assert (tmp_path / "stale" / "slot0").exists() and busy["left"] == 2


# ---- one pool behind several HTTP fronts (recipe.retool.sandbox.fronts) ----


async def test_one_pool_serves_every_front_and_a_front_that_goes_away_gives_its_workers_back():
    """All workers run the requests of whichever front has them (no front-local share), one queue
    for all; a request whose client left quits the queue; a front's channel closing kills its runs."""
    import socket
    import time

    from recipe.retool.sandbox.fronts import PoolService, RemotePool
    from recipe.retool.sandbox.pool import Abandoned, PoolGone

    pool = WorkerPool(SandboxConfig(workers=2, preload=["math"], warmup=False))
    await pool.start()
    service = PoolService(pool, 2)
    channels = [socket.socketpair() for _ in range(2)]
    ready = [asyncio.Event(), asyncio.Event()]
    serving = [asyncio.create_task(service.serve(i, ch[0], ready[i])) for i, ch in enumerate(channels)]
    lost: list[int] = []
    fronts = [RemotePool(ch[1], on_lost=lambda i=i: lost.append(i)) for i, ch in enumerate(channels)]
    try:
        for i, front in enumerate(fronts):
            await front.start()
            await asyncio.wait_for(ready[i].wait(), 10)
            assert front.capabilities == pool.capabilities and front.cgroup_plan == pool.cgroup_plan
        sleep = {"code": "import time; time.sleep(3); print(7)", "run_timeout": 10}
        t = time.perf_counter()
        outs = await asyncio.gather(fronts[0].run(sleep), fronts[0].run(sleep))
        assert [o["run_result"]["stdout"] for o in outs] == ["7\n", "7\n"]
        # side by side on both workers (3 s and a little), not one after the other (6 s at least)
        assert time.perf_counter() - t < 5
        report = await fronts[1].report()
        assert report["requests_by_front"] == [2, 0] and report["stats"]["requests"] == 2
        assert report["workers"] == report["live"] == 2 and report["status"] == "ok"

        long = {"code": "import time; time.sleep(30)", "run_timeout": 60}
        running = [asyncio.create_task(fronts[1].run(long)) for _ in range(2)]
        while (await fronts[0].report())["idle"]:
            await asyncio.sleep(0.05)
        gone = asyncio.Event()
        queued = asyncio.create_task(fronts[0].run({"code": "print(1)"}, gone))
        while not (await fronts[0].report())["queued"]:
            await asyncio.sleep(0.05)
        gone.set()
        try:
            await asyncio.wait_for(queued, 10)
            raise AssertionError("an abandoned request should leave the queue")
        except Abandoned:
            pass
        assert (await fronts[0].report())["queued"] == 0

        t = time.perf_counter()
        await fronts[1].close()  # front 1's process is gone: its two 30 s runs are killed
        out = await asyncio.wait_for(fronts[0].run({"code": "print(2)", "run_timeout": 5}), 20)
        assert out["run_result"]["stdout"] == "2\n" and time.perf_counter() - t < 15
        await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 10)
        await asyncio.wait_for(serving[1], 10)
        assert pool.health()["live"] == 2 and pool.stats["worker_restarts"] == 0  # killed runs, same workers
        assert lost == [1]  # a front notices its own channel closing (the real one then stops)
        try:  # and answers what comes after as the pool being gone (HTTP 503, which clients retry)
            await fronts[1].run({"code": "print(3)"})
            raise AssertionError("a front without its pool should say so")
        except PoolGone:
            pass
    finally:
        for front in fronts:
            await front.close()
        await asyncio.wait_for(asyncio.gather(*serving, return_exceptions=True), 10)
        await pool.close()


async def test_the_pools_process_passes_a_request_and_its_answer_through_as_bytes(monkeypatch):
    """Behind several fronts, a run's request (validated and encoded by its front) and its answer
    (encoded by the worker) cross the pool's process as bytes: a 2 MiB file in and out is never
    decoded or encoded there, so one large request does not hold up the pool's other requests."""
    import base64
    import json
    import socket
    import types

    from recipe.retool.sandbox import fronts as fronts_mod
    from recipe.retool.sandbox import pool as pool_mod
    from recipe.retool.sandbox.fronts import PoolService, RemotePool

    seen: list[int] = []  # sizes of what the pool's and the fronts' modules encode and decode

    def recording(fn, size):
        return lambda obj, *a, **k: (seen.append(size(obj)), fn(obj, *a, **k))[1]

    spy = types.SimpleNamespace(dumps=recording(json.dumps, lambda o: len(json.dumps(o))),
                                loads=recording(json.loads, len))
    data = os.urandom(2 * 2**20)
    request = {"code": "import shutil; shutil.copy('in.bin', 'out.bin')", "run_timeout": 10,
               "files": {"in.bin": base64.b64encode(data).decode()}, "fetch_files": ["out.bin"]}
    body = json.dumps(request).encode()
    pool = WorkerPool(SandboxConfig(workers=1, preload=["math"], warmup=False))
    await pool.start()
    service = PoolService(pool, 1)
    pool_side, front_side = socket.socketpair()
    ready = asyncio.Event()
    serving = asyncio.create_task(service.serve(0, pool_side, ready))
    front = RemotePool(front_side, on_lost=lambda: None)
    try:
        await front.start()
        await asyncio.wait_for(ready.wait(), 10)
        monkeypatch.setattr(fronts_mod, "json", spy)
        monkeypatch.setattr(pool_mod, "json", spy)
        answer = await asyncio.wait_for(front.run_encoded(body, request["run_timeout"]), 60)
        monkeypatch.undo()
        resp = json.loads(answer)
        assert resp["status"] == "Success", resp
        assert base64.b64decode(resp["files"]["out.bin"]) == data
        assert seen and max(seen) < 4096, f"a body was encoded or decoded on its way: {max(seen)} bytes"
    finally:
        monkeypatch.undo()
        await front.close()
        await asyncio.wait_for(serving, 10)
        await pool.close()
