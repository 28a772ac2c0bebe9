"""The sandbox server: SandboxFusion contract, both real clients, isolation against hostile code."""

from __future__ import annotations

import base64
import os
import time

import httpx
import pytest


def run(server, code: str, **kw) -> dict:
    resp = httpx.post(server.url + "/run_code", json={"code": code, "language": "python", **kw}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_healthy(server) -> None:
    """The server is up and an ordinary request is answered correctly."""
    assert server.alive()
    body = run(server, "import sympy\nprint(sympy.factorint(360))")
    assert body["status"] == "Success" and body["run_result"]["stdout"] == "{2: 3, 3: 2, 5: 1}\n", body


# ----------------------------------------------------------------------------- contract


def test_success_failure_and_response_shape(sandbox_server):
    ok = run(sandbox_server, "print('hi')")
    assert ok["status"] == "Success" and ok["message"] == "" and ok["compile_result"] is None
    rr = ok["run_result"]
    assert rr["status"] == "Finished" and rr["return_code"] == 0 and rr["stdout"] == "hi\n" and rr["stderr"] == ""
    assert rr["execution_time"] > 0 and "files" in ok and "executor_pod_name" in ok
    err = run(sandbox_server, "x = 1\nraise ValueError('boom')")
    assert err["status"] == "Failed" and err["run_result"]["status"] == "Finished"
    assert err["run_result"]["return_code"] == 1
    assert 'main.py", line 2' in err["run_result"]["stderr"] and "ValueError: boom" in err["run_result"]["stderr"]
    assert "worker.py" not in err["run_result"]["stderr"]  # traceback looks like `python main.py`
    syn = run(sandbox_server, "def f(:\n  pass")
    assert syn["status"] == "Failed" and "SyntaxError" in syn["run_result"]["stderr"]
    ex = run(sandbox_server, "import sys; print('a'); sys.exit(3)")
    assert ex["run_result"]["return_code"] == 3 and ex["run_result"]["stdout"] == "a\n"


def test_stdin_files_and_fetch(sandbox_server):
    body = run(sandbox_server, "import sys\ndata = open('in/data.txt').read()\nprint(sys.stdin.read().upper(), data)\n"
               "open('out.txt', 'w').write(data * 2)",
               stdin="hello", files={"in/data.txt": base64.b64encode(b"xyz").decode()},
               fetch_files=["out.txt", "missing.txt"])
    assert body["run_result"]["stdout"] == "HELLO xyz\n"
    assert base64.b64decode(body["files"]["out.txt"]) == b"xyzxyz"
    assert "missing.txt" in body["message"]


def test_bad_requests_and_unknown_fields(sandbox_server):
    r = httpx.post(sandbox_server.url + "/run_code", json={"language": "python"})
    assert r.status_code == 422 and "code" in r.text
    r = httpx.post(sandbox_server.url + "/run_code", json={"code": "print(1)", "run_timeout": -1})
    assert r.status_code == 422
    body = run(sandbox_server, "print(1)", some_future_field={"a": 1}, compile_timeout=3)
    assert body["status"] == "Success"
    body = run(sandbox_server, "int main(){}", language="cpp")
    assert body["status"] == "SandboxError" and "not supported" in body["message"]
    r = httpx.post(sandbox_server.url + "/run_code", json={"code": "print(1)", "files": {"../escape.txt": ""}})
    assert r.status_code == 422 and "leaves the work dir" in r.text
    assert httpx.get(sandbox_server.url + "/v1/ping").text == "pong"


def test_official_sandbox_fusion_client(sandbox_server):
    from sandbox_fusion import RunCodeRequest, RunStatus, run_code, set_endpoint

    set_endpoint(sandbox_server.url)
    res = run_code(RunCodeRequest(code="print(sum(range(10)))", language="python"))
    assert res.status == RunStatus.Success and res.run_result.stdout == "45\n"
    res = run_code(RunCodeRequest(code="while True: pass", language="python", run_timeout=1))
    assert res.status == RunStatus.Failed and res.run_result.status.value == "TimeLimitExceeded"


def test_verl_call_sandbox_api(sandbox_server):
    from verl.utils.reward_score.sandbox_fusion.utils import call_sandbox_api

    body, err = call_sandbox_api(sandbox_server.url + "/run_code", "import sys\nprint(int(input()) * 2)", "21",
                                 compile_timeout=5, run_timeout=5, memory_limit_mb=512)
    assert err is None and body["status"] == "Success" and body["run_result"]["stdout"] == "42\n"
    body, err = call_sandbox_api(sandbox_server.url + "/run_code", "import sys\nsys.stderr.write('x')\nsys.exit(2)",
                                 "", compile_timeout=5, run_timeout=5, memory_limit_mb=512)
    assert err is None and body["status"] == "Failed" and body["run_result"]["stderr"] == "x"


# ----------------------------------------------------------------------------- hostile code


def test_infinite_loop_is_killed_at_the_deadline(sandbox_server):
    t = time.time()
    body = run(sandbox_server, "print('start', flush=True)\nwhile True: pass", run_timeout=1)
    assert time.time() - t < 5
    assert body["status"] == "Failed" and body["run_result"]["status"] == "TimeLimitExceeded"
    assert body["run_result"]["stdout"] == "start\n"
    assert_healthy(sandbox_server)


def test_fork_bomb(sandbox_server):
    body = run(sandbox_server, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
               run_timeout=2)
    assert body["status"] == "Failed"
    assert_healthy(sandbox_server)


def test_memory_bomb(sandbox_server):
    body = run(sandbox_server, "x = bytearray(2 * 1024**3)\nprint('allocated')", memory_limit_MB=256)
    assert body["status"] == "Failed" and "MemoryError" in body["run_result"]["stderr"]
    assert "allocated" not in body["run_result"]["stdout"]
    small = run(sandbox_server, "x = bytearray(100 * 1024**2)\nprint(len(x))", memory_limit_MB=256)
    assert small["status"] == "Success"  # the limit is a budget for the user's code
    assert_healthy(sandbox_server)


def test_child_that_outlives_its_parent_is_swept(sandbox_server):
    code = ("import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    while True: pass\n"
            "print('parent done')")
    for _ in range(3):
        body = run(sandbox_server, code, run_timeout=5)
        assert body["status"] == "Success" and body["run_result"]["stdout"] == "parent done\n"
    # no busy leftovers: a run that counts the processes it can see finds only itself
    seen = run(sandbox_server, "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))")
    assert int(seen["run_result"]["stdout"]) <= 2  # pid 1 (the worker) and this run
    assert_healthy(sandbox_server)


def test_disk_fill(sandbox_server):
    code = ("import os\nn = 0\ntry:\n    with open('big', 'wb') as f:\n        while True:\n"
            "            f.write(b'x' * 2**20); n += 1\nexcept OSError as e:\n    print('stopped', n)")
    body = run(sandbox_server, code, run_timeout=10)
    assert body["status"] in ("Success", "Failed")
    # bounded by RLIMIT_FSIZE (SIGXFSZ kills the run) or the private tmpfs size
    assert "stopped" in body["run_result"]["stdout"] or body["run_result"]["return_code"] != 0
    assert_healthy(sandbox_server)


def test_huge_stdout_is_truncated_with_marker(sandbox_server):
    t = time.time()
    body = run(sandbox_server, "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1024 * 1024)",
               run_timeout=20)
    assert time.time() - t < 20
    out = body["run_result"]["stdout"]
    assert len(out) < 300 * 1024 and "output truncated" in out
    assert_healthy(sandbox_server)


def test_environment_and_proc_hold_no_secrets(sandbox_server):
    code = ("import os, glob\nleak = [k for k, v in os.environ.items() if 'canary' in v]\nfound = []\n"
            "for p in glob.glob('/proc/*/environ'):\n    try:\n        data = open(p, 'rb').read()\n"
            "        if b'canary' in data: found.append(p)\n    except OSError:\n        pass\n"
            "print(leak, found, sorted(os.environ))")
    body = run(sandbox_server, code)
    assert body["status"] == "Success", body
    assert sandbox_server.SECRET not in body["run_result"]["stdout"]
    assert body["run_result"]["stdout"].startswith("[] []")
    assert "HF_TOKEN" not in body["run_result"]["stdout"]


def test_writes_outside_the_work_dir_fail_or_stay_private(sandbox_server, tmp_path):
    targets = ["/tmp/escape.txt", "/var/tmp/escape.txt", "/root/escape.txt", os.getcwd() + "/escape.txt",
               "/etc/escape.txt", "/run/lock/escape.txt", str(tmp_path / "escape.txt")]
    code = "import sys\nfor p in sys.argv[1:] or %r:\n    try:\n        open(p, 'w').write('x'); print('wrote', p)\n" \
           "    except OSError as e:\n        print('denied', p)" % (targets,)
    body = run(sandbox_server, code)
    assert body["status"] == "Success"
    for t in targets:
        assert not os.path.exists(t), f"{t} escaped the sandbox"
    # /tmp is the request's own (a private tmpfs, gone with the request); everything else is read-only
    wrote = [line for line in body["run_result"]["stdout"].splitlines() if line.startswith("wrote")]
    assert wrote == ["wrote /tmp/escape.txt"], body["run_result"]["stdout"]


def test_home_and_repo_are_hidden(sandbox_server):
    body = run(sandbox_server, "import os\nprint(os.listdir('/root'), os.path.exists(os.path.join(%r, 'setup.py')))"
               % os.getcwd())
    assert body["status"] == "Success", body
    listed, repo_visible = body["run_result"]["stdout"].rsplit(" ", 1)
    assert repo_visible.strip() == "False"


def test_network_is_unreachable_even_to_the_server(sandbox_server):
    code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=2)\n    print('connected')\n"
            "except OSError as e:\n    print('blocked', type(e).__name__)") % sandbox_server.port
    body = run(sandbox_server, code)
    assert body["run_result"]["stdout"].startswith("blocked"), body


def test_killing_the_server_pid_does_nothing(sandbox_server):
    code = ("import os, signal\nfor pid in (%d, 1, %d):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\nprint('still here')") % (
        sandbox_server.proc.pid, os.getpid())
    run(sandbox_server, code)
    time.sleep(0.5)
    assert sandbox_server.alive()
    assert_healthy(sandbox_server)


def test_no_state_carried_to_the_next_request(sandbox_server):
    leave = ("import os\nopen('left.txt', 'w').write('x')\nfor p in ('/tmp/left.txt', '/dev/shm/left.txt'):\n"
             "    try:\n        open(p, 'w').write('x')\n    except OSError:\n        pass\n"
             "import sys; sys.modules['json'].LEFT = 1\nprint(os.getcwd())")
    first = run(sandbox_server, leave)["run_result"]["stdout"].strip()
    check = ("import os, json, glob\nprint(sorted(os.listdir('.')), hasattr(json, 'LEFT'), "
             "glob.glob('/tmp/**/left.txt', recursive=True) + glob.glob('/dev/shm/left.txt'), os.path.exists(%r))"
             % (first + "/left.txt"))
    for _ in range(4):  # whichever worker answers
        out = run(sandbox_server, check)["run_result"]["stdout"]
        assert out.strip() == "['main.py'] False [] False", out


def test_sandbox_uses_warm_preloaded_modules(sandbox_server):
    body = httpx.get(sandbox_server.url + "/health").json()
    assert "sympy" in body["preloaded"] and "numpy" in body["preloaded"]
    caps = body["capabilities"]
    assert caps["net_namespace"] and caps["pid_namespace"] and caps["allowlisted_root"] and caps["seccomp"]
    assert caps["cgroup"] in ("v1", "v2") and body["status"] == "ok" and body["live"] == body["workers"]
    t = time.perf_counter()
    res = run(sandbox_server, "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 4, x))")
    assert res["run_result"]["stdout"] == "[-2, 2]\n"
    assert time.perf_counter() - t < 2.0  # a cold `import sympy` alone takes about this long


@pytest.mark.parametrize("n", [32])
def test_concurrent_mixed_requests_are_all_answered_correctly(sandbox_server, n):
    import asyncio

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(i):
                kind = i % 4
                code = [f"print({i} * 2)", "raise KeyError('k')", "import sys\nprint(sys.stdin.read())",
                        "while True: pass"][kind]
                r = await client.post(sandbox_server.url + "/run_code", json={
                    "code": code, "language": "python", "stdin": f"in{i}", "run_timeout": 1})
                return kind, i, r.json()
            return await asyncio.gather(*(one(i) for i in range(n)))

    for kind, i, body in asyncio.run(go()):
        rr = body["run_result"]
        if kind == 0:
            assert body["status"] == "Success" and rr["stdout"] == f"{i * 2}\n"
        elif kind == 1:
            assert body["status"] == "Failed" and "KeyError" in rr["stderr"]
        elif kind == 2:
            assert body["status"] == "Success" and rr["stdout"] == f"in{i}\n"
        else:
            assert body["status"] == "Failed" and rr["status"] == "TimeLimitExceeded"
