"""recipe.retool.bounded_verify: the reward's symbolic check, in a child process bounded in time."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from recipe.retool import bounded_verify
from recipe.retool.bounded_verify import VerifierError, symbolically_equal


def test_equal_unequal_and_late():
    assert symbolically_equal("$\\sqrt{2}$", "$\\frac{\\sqrt{8}}{2}$") is True
    assert symbolically_equal("$\\sqrt{2}$", "$\\frac{\\sqrt{8}}{3}$") is False
    before = bounded_verify.timeouts()
    assert symbolically_equal("$5$", "$9^{9^{9}}$", timeout=1.0) is None  # late: the caller judges it wrong
    assert bounded_verify.timeouts() == before + 1
    assert symbolically_equal("$1/2$", "$0.5$") is True  # a new child replaces the killed one


def test_descriptor_numbers_past_1024_do_not_break_the_wait():
    """A training process holds many descriptors; select() refuses numbers of 1024 and more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"descriptor limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        bounded_verify._pool.idle.clear()  # a child started now gets descriptors past 1024
        assert symbolically_equal("$\\sqrt{2}$", "$\\frac{\\sqrt{8}}{2}$") is True
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_verifier_that_cannot_start_says_why(tmp_path, monkeypatch):
    broken = tmp_path / "math_verify"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('math-verify is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setattr(bounded_verify, "_pool", bounded_verify._Pool())
    with pytest.raises(VerifierError, match="math-verify is not installed here"):
        symbolically_equal("$1$", "$x$")


def test_a_forked_process_starts_its_own_verifiers():
    """After fork the parent's children (and a lock another thread may hold) are not the child's."""
    program = """
import os, sys
from recipe.retool import bounded_verify
assert bounded_verify.symbolically_equal("$1/2$", "$0.5$") is True
parents = list(bounded_verify._pool.idle)
bounded_verify._pool.lock.acquire()  # as if another thread held it at the fork
pid = os.fork()
if pid == 0:
    ok = not bounded_verify._pool.idle and bounded_verify.symbolically_equal("$1/4$", "$0.25$") is True
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_idle_children_are_capped():
    pool = bounded_verify._Pool()
    children = [bounded_verify._Child() for _ in range(bounded_verify.MAX_IDLE + 2)]
    for child in children:
        pool.give_back(child)
    assert len(pool.idle) == bounded_verify.MAX_IDLE
    assert sum(c.proc.poll() is not None for c in children) == 2  # the extra ones were stopped
    for child in pool.idle:
        child.kill()
