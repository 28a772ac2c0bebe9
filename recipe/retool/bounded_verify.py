"""math-verify's symbolic equivalence, bounded in time from any thread or process.

A boxed answer of a few dozen characters can make a symbolic check run for minutes
(``9^{9^{9}}`` asks SymPy for a 370-million-digit integer). math-verify's own time-outs use
signals, so they work only in a process's main thread, and verl calls the reward from worker
threads (``run_in_executor``) and Ray actors; worse, a big-integer power runs inside one C call
that holds the GIL, so no thread-based time-out can interrupt it either: the whole process stalls.

So the check runs in a child process, and the caller waits at most ``timeout`` seconds for its
answer. Children come from a pool shared by the calling threads: one per check in flight, started
on first use and reused, at most :data:`MAX_IDLE` kept idle. When an answer is late the child is
killed (a new one starts at the next call) and the check counts as **not equivalent**: a
pathological answer is judged wrong, never correct. Time-outs are counted (:func:`timeouts`) and
logged with the answer.

The child speaks JSON lines on its stdin/stdout: ``{"gold": …, "guess": …}`` → ``{"equal": bool}``.
It exits when its stdin closes, that is when the process that started it exits or kills it; a
check already running when the parent dies finishes first (it is never longer than SymPy takes).
A child that cannot start (math-verify missing, say) raises :class:`VerifierError` with its stderr.

What this does not bound: the fast paths of :func:`recipe.retool.reward.judge` (string and number
comparison, linear in the answer's length) run in the caller; only the symbolic step is sent here.
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
MAX_IDLE = 4  # idle children kept for reuse (each holds SymPy: ~60 MB)


class VerifierError(RuntimeError):
    """The verifier process could not be started."""


class _Child:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "recipe.retool.bounded_verify"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, bufsize=1)
        if self._read(START_TIMEOUT_S) != {"ready": True}:
            self.kill()
            err = (self.proc.stderr.read() if self.proc.stderr else "").strip()
            raise VerifierError("the symbolic verifier process did not start"
                                + (f": {err.splitlines()[-1]}" if err else f" within {START_TIMEOUT_S:.0f}s"))
        self.proc.stderr.close()  # nothing more is read from it; a full pipe must not block the child

    def _read(self, timeout: float) -> dict | None:
        """One answer line, or None when none came within ``timeout`` (poll: any descriptor number)."""
        assert self.proc.stdout is not None
        poller = select.poll()
        poller.register(self.proc.stdout.fileno(), select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
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
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class _Pool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Child] = []
        self.timeouts = 0

    def take(self) -> _Child:
        with self.lock:
            while self.idle:
                child = self.idle.pop()
                if child.proc.poll() is None:
                    return child
        return _Child()

    def give_back(self, child: _Child) -> None:
        with self.lock:
            if len(self.idle) < MAX_IDLE:
                self.idle.append(child)
                return
        child.kill()


_pool = _Pool()


def _forget_parents_children() -> None:
    """In a forked child: the parent's verifier processes and lock are not ours (the lock may be held)."""
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_forget_parents_children)


def timeouts() -> int:
    """Symbolic checks that ran past their time in this process so far."""
    return _pool.timeouts


def symbolically_equal(gold: str, guess: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """math-verify's ``verify(parse(gold), parse(guess))`` within ``timeout`` seconds; None when late
    (the caller judges that *not* equivalent). :class:`VerifierError` when no verifier can start."""
    pool = _pool
    child = pool.take()
    started = time.monotonic()
    try:
        result = child.check(gold, guess, timeout)
    except (OSError, ValueError) as exc:  # the child died under us (broken pipe, truncated line)
        child.kill()
        logger.warning("reward: the symbolic verifier failed (%s: %s); judged not equivalent: %.80r",
                       type(exc).__name__, exc, guess)
        return False
    if result is None:
        child.kill()
        with pool.lock:
            pool.timeouts += 1
            count = pool.timeouts
        logger.warning("reward: a symbolic check ran past %.1fs and was judged wrong (%d time-outs so far): %.80r",
                       time.monotonic() - started, count, guess)
        return None
    pool.give_back(child)
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
