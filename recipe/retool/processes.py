"""Local server processes of the recipe: a free port, "wait until it answers", a clean stop, and our
sandbox server started as a subprocess on loopback (pipeline, miniature, tests, benchmarks).

These helpers belong to the recipe, not to the sandbox package: model servers use them too, and
the sandbox imports nothing of the recipe."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "server",
                       interval: float = 0.25) -> None:
    """Block until ``GET url`` answers 200; fail early if ``proc`` (the server's process) exits.

    Polls every ``interval`` seconds (after an error *and* after a non-200 answer) and raises
    RuntimeError after ``timeout`` seconds, naming the last answer. The one "wait until a server
    answers" loop of the project: sandbox, model servers, launchers, benchmarks.
    """
    import httpx

    deadline = time.time() + timeout
    last = "no answer"
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering {url} (see its log)")
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(interval)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s (last: {last})")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: how every local server of the project is stopped."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalSandbox:
    """``python -m recipe.retool.sandbox serve`` on 127.0.0.1; ``wait()`` blocks until it answers."""

    def __init__(self, workers: int | None = 2, env: dict[str, str] | None = None, cwd: str | None = None,
                 extra_args: Sequence[str] = (), port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "recipe.retool.sandbox", "serve", "--port", str(self.port), "--log-level", "warning"]
        if workers:
            args += ["--workers", str(workers)]
        self.proc = subprocess.Popen([*args, *extra_args], env=env, cwd=cwd)

    def wait(self, timeout: float = 120) -> LocalSandbox:
        try:
            wait_until_healthy(self.url + "/v1/ping", timeout, self.proc, "sandbox server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)
