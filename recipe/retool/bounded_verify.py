"""math-verify's symbolic equivalence, bounded in time from any thread or process.

A boxed answer of a few dozen characters can make a symbolic check run for minutes
(``9^{9^{9}}`` asks SymPy for a 370-million-digit integer). math-verify's own time-outs use
signals, so they work only in a process's main thread, and verl calls the reward from worker
threads (``run_in_executor``) and Ray actors; worse, a big-integer power runs inside one C call
that holds the GIL, so no thread-based time-out can interrupt it either: the whole process stalls.

So the check runs in a child process (from a pool shared by the calling threads: one per check in
flight, started on first use and reused), and the caller waits at most ``timeout`` seconds for its
answer. When the answer is late the child is
killed (it is restarted at the next call) and the check counts as **not equivalent**: a
pathological answer is judged wrong, never correct. Time-outs are counted (:func:`timeouts`).

The child speaks JSON lines on its stdin/stdout: ``{"gold": …, "guess": …}`` → ``{"equal": bool}``.
It exits when its stdin closes, so it never outlives the process that started it.

What this does not bound: the fast paths of :func:`recipe.retool.reward.is_equivalent` (string and
number comparison, linear in the answer's length) run in the caller; only the symbolic step is
sent here.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0  # importing SymPy and math-verify in a fresh process (not counted against a check)
_lock = threading.Lock()
_idle: list[_Child] = []  # children waiting for a check
_owner = os.getpid()  # a forked copy of this process starts its own children
_timeouts = 0


def timeouts() -> int:
    """Symbolic checks that ran past their time in this process so far."""
    return _timeouts


class _Child:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "recipe.retool.bounded_verify"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        if self._read(START_TIMEOUT_S) != {"ready": True}:
            self.kill()
            raise RuntimeError("the symbolic verifier process did not start")

    def _read(self, timeout: float) -> dict | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def check(self, gold: str, guess: str, timeout: float) -> bool | None:
        """True/False, or None when no answer came within ``timeout`` seconds."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"gold": gold, "guess": guess}) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout)
        return None if answer is None else bool(answer.get("equal"))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _take() -> _Child:
    global _owner
    with _lock:
        if _owner != os.getpid():
            _idle.clear()
            _owner = os.getpid()
        while _idle:
            child = _idle.pop()
            if child.proc.poll() is None:
                return child
    return _Child()


def symbolically_equal(gold: str, guess: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """math-verify's ``verify(parse(gold), parse(guess))`` within ``timeout`` seconds; None when late
    (the caller judges that *not* equivalent)."""
    global _timeouts
    child = _take()
    started = time.monotonic()
    try:
        result = child.check(gold, guess, timeout)
    except (OSError, ValueError):  # the child died under us (broken pipe, truncated line)
        child.kill()
        return False
    if result is None:
        child.kill()
        with _lock:
            _timeouts += 1
            count = _timeouts
        logger.warning("reward: a symbolic check ran past %.1fs and was judged wrong (%d time-outs so far): %.80r",
                       time.monotonic() - started, count, guess)
        return None
    with _lock:
        _idle.append(child)
    return result


def _serve() -> None:
    """The child: answer checks from stdin until it closes."""
    from math_verify import parse, verify

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold, guess = parse(request["gold"]), parse(request["guess"])
            equal = bool(gold) and bool(guess) and bool(verify(gold, guess))
        except Exception:
            equal = False
        print(json.dumps({"equal": equal}), flush=True)


if __name__ == "__main__":
    _serve()
