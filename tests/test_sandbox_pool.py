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
