"""Start our sandbox server as a local subprocess on a free loopback port (demo, tests, benchmarks)."""

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
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandbox server exited with code {self.proc.returncode} (see its log above)")
            try:
                if httpx.get(self.url + "/v1/ping", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"sandbox server did not answer within {timeout:.0f}s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
