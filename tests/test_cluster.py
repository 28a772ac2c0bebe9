"""recipe.retool.cluster: a node's place in a cluster, the commands it starts, and a real Ray cluster
of two nodes on this machine (the trainers across it: tests/distributed)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from recipe.retool.cluster import Cluster, main, ray_env, ray_start_command, torchrun_env

ROOT = Path(__file__).resolve().parents[1]


def test_a_node_knows_its_rank_and_the_head():
    node = Cluster(1, ("10.0.0.1", "10.0.0.2"), 6379)
    assert (node.nodes, node.head, node.head_address) == (2, "10.0.0.1", "10.0.0.1:6379")
    with pytest.raises(ValueError, match="rank 2 is outside the cluster's 2 nodes"):
        Cluster(2, ("a", "b"), 1)
    with pytest.raises(ValueError, match="at least one node"):
        Cluster(0, (), 1)


def test_torchrun_rendezvous_is_at_rank_0():
    assert torchrun_env(Cluster(1, ("10.0.0.1", "10.0.0.2"), 29500)) == {
        "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_ray_start_commands_of_the_head_and_a_worker():
    head = ray_start_command(Cluster(0, ("10.0.0.1", "10.0.0.2"), 6380), gpus=8)
    worker = ray_start_command(Cluster(1, ("10.0.0.1", "10.0.0.2"), 6380), gpus=8, cpus=4)
    assert head[1:3] == ["start", "--block"] and "--head" in head and "--port=6380" in head
    assert "--node-ip-address=10.0.0.1" in head and "--num-gpus=8" in head and not any("--address" in a for a in head)
    assert "--address=10.0.0.1:6380" in worker and "--node-ip-address=10.0.0.2" in worker and "--num-cpus=4" in worker
    assert "--head" not in worker


def test_the_cluster_authenticates_and_keeps_its_own_ray_directory():
    env = ray_env(Cluster(0, ("h", "w"), 6390), "t" * 32)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "t" * 32
    # not Ray's default directory, whose record of the last cluster a plain ray.init() would join
    assert env["RAY_TMPDIR"] == os.path.join(tempfile.gettempdir(), "retool-ray-6390")


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "ray", "--rank", "0", "--addresses", "a,b", "--", "true"], "set RAY_AUTH_TOKEN"),
    (["--launcher", "ray", "--rank", "3", "--addresses", "a,b", "--", "true"], "rank 3 is outside"),
])
def test_bad_cluster_arguments_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_command_is_required_where_it_runs():
    with pytest.raises(SystemExit):
        main(["--launcher", "torchrun", "--rank", "1", "--addresses", "a,b"])


def test_torchrun_nodes_run_the_command_with_the_rendezvous(tmp_path):
    out = tmp_path / "env.txt"
    code = main(["--launcher", "torchrun", "--rank", "1", "--addresses", "10.1.1.1,10.1.1.2", "--port", "29511", "--",
                 sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ['NODE_RANK'] + "
                 "' ' + os.environ['MASTER_ADDR'] + ':' + os.environ['MASTER_PORT'])"])
    assert code == 0 and out.read_text() == "1 10.1.1.1:29511"


PROBE = ("import json, os, ray; ray.init(); "
         "print('NODES', json.dumps(sorted(n['Resources'].get('GPU', 0) for n in ray.nodes() if n['Alive'])), "
         "os.environ['RAY_ADDRESS'])")


@pytest.mark.slow  # starts two Ray nodes
@pytest.mark.timeout(300)
def test_two_nodes_join_run_the_command_on_the_head_and_leave_nothing_behind(tmp_path):
    from recipe.retool.processes import free_port

    port = free_port()
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    base = [sys.executable, "-m", "recipe.retool.cluster", "--launcher", "ray", "--addresses", "127.0.0.1,127.0.0.1",
            "--port", str(port), "--gpus", "1", "--cpus", "2"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    worker = subprocess.Popen([*base, "--rank", "1"], env=env, cwd=ROOT, stdout=logs[1].open("w"), stderr=subprocess.STDOUT)
    try:
        head = subprocess.run([*base, "--rank", "0", "--", sys.executable, "-c", PROBE], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        assert worker.wait(timeout=60) == 0, logs[1].read_text()[-2000:]
    finally:
        _terminate(worker)
    assert head.returncode == 0, head.stderr[-3000:]
    # the command ran once, on the head, against both nodes (each offering one GPU slot)
    assert f"NODES [1.0, 1.0] 127.0.0.1:{port}" in head.stdout
    assert "2 nodes joined" in head.stderr and "the head is gone; leaving" in logs[1].read_text()
    # nothing of this cluster is left running, and no plain ray.init() on the machine would look for it
    left = subprocess.run(["pgrep", "-af", f"retool-ray-{port}"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in left if "pgrep" not in line], left
    default_record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    assert not default_record.exists() or f":{port}" not in default_record.read_text()


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # the runner stops its Ray processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _left_running(port: int) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"retool-ray-{port}|sleep 417"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.slow  # starts Ray
@pytest.mark.timeout(300)
def test_a_node_whose_ray_cannot_join_fails_and_the_head_gives_up(tmp_path):
    """A worker with the wrong token: its `ray start` is refused while the head still answers, so it
    exits non-zero at once (not 0, as if the run had ended); the head stops waiting at its time-out."""
    from recipe.retool.processes import free_port

    port = free_port()
    base = [sys.executable, "-m", "recipe.retool.cluster", "--launcher", "ray", "--addresses", "127.0.0.1,127.0.0.1",
            "--port", str(port), "--gpus", "0", "--cpus", "1"]
    head = subprocess.Popen([*base, "--rank", "0", "--join-timeout", "30", "--", "true"], cwd=ROOT,
                            env={**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(16)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        worker = subprocess.run([*base, "--rank", "1"], cwd=ROOT, env={**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(16)},
                                capture_output=True, text=True, timeout=200)
        assert worker.returncode != 0 and "this node's Ray exited" in worker.stderr, worker.stderr[-2000:]
        out, _ = head.communicate(timeout=200)
        assert head.returncode == 2 and "2 nodes in the Ray cluster: not after 30 s" in out, out[-2000:]
    finally:
        _terminate(head)
    assert not _left_running(port)


@pytest.mark.slow  # starts Ray
@pytest.mark.timeout(300)
def test_a_terminated_head_stops_its_command_and_its_ray(tmp_path):
    from recipe.retool.processes import free_port

    port = free_port()
    head = subprocess.Popen([sys.executable, "-m", "recipe.retool.cluster", "--launcher", "ray", "--rank", "0",
                             "--addresses", "127.0.0.1", "--port", str(port), "--gpus", "0", "--cpus", "1", "--",
                             "sleep", "417"], cwd=ROOT, env={**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(16)},
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in head.stderr:  # wait until the command runs
            if "running the command" in line:
                break
        assert _left_running(port)  # Ray and the command are up
        head.terminate()
        assert head.wait(timeout=90) == 128 + 15
    finally:
        if head.poll() is None:
            head.kill()
    assert not _left_running(port)
