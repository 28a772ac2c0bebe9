"""Join this node to a training cluster of several nodes and run a stage across it.

    python -m recipe.retool.cluster --launcher ray      --rank R --addresses A0,A1,... -- COMMAND ...
    python -m recipe.retool.cluster --launcher torchrun --rank R --addresses A0,A1,... -- COMMAND ...

Run it once on every node, each with its own ``--rank`` and the same ``--addresses`` (every node's
address, rank 0's first: what a Modal cluster tells its containers). The cloud path runs this
command in each container of a cluster (``recipe.retool.cloud.launcher.node_command``); on machines
of one's own, the same command with the ranks written out does the same.

- ``ray`` (GRPO): rank 0 starts the Ray head and waits until every node has joined, then runs
  COMMAND with ``RAY_ADDRESS`` pointing at the head, so verl's trainer drives the whole cluster
  (COMMAND sets ``trainer.nnodes``). The other ranks join the head and stay until it is gone.
  The cluster's nodes authenticate with a shared token (``RAY_AUTH_TOKEN``, the same on every node).
- ``torchrun`` (SFT): every rank runs COMMAND with ``NODE_RANK``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` set, which ``recipe.retool.train`` hands to torchrun's rendezvous on rank 0.

The exit status is COMMAND's on rank 0 (and on every rank with torchrun); a worker node of a Ray
cluster exits 0 once the head is gone, non-zero if its Ray could not join or crashed. Ray's processes are started in their
own process group and stopped with it, so other Ray instances on the machine are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from recipe.retool.processes import stop_process

RAY_PORT = 6379  # Ray's default GCS port
TORCH_PORT = 29500  # torchrun's default rendezvous port
TOKEN_ENV = "RAY_AUTH_TOKEN"  # Ray's own name for the cluster token
LAUNCHERS = ("ray", "torchrun")


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Cluster:
    """This node's place in the cluster: its rank and every node's address (rank 0's first)."""

    rank: int
    addresses: tuple[str, ...]
    port: int

    def __post_init__(self):
        if not self.addresses:
            raise ValueError("a cluster needs at least one node address")
        if not 0 <= self.rank < len(self.addresses):
            raise ValueError(f"rank {self.rank} is outside the cluster's {len(self.addresses)} nodes")

    @property
    def nodes(self) -> int:
        return len(self.addresses)

    @property
    def head(self) -> str:
        return self.addresses[0]

    @property
    def head_address(self) -> str:
        return f"{self.head}:{self.port}"


def torchrun_env(cluster: Cluster) -> dict[str, str]:
    """What ``recipe.retool.train`` gives torchrun on a node of a multi-node SFT run."""
    return {"NODE_RANK": str(cluster.rank), "MASTER_ADDR": cluster.head, "MASTER_PORT": str(cluster.port)}


def ray_env(cluster: Cluster, token: str) -> dict[str, str]:
    """The environment of every Ray process of the cluster: token authentication, no usage reports,
    and a Ray directory of its own. Ray records the last cluster started on a machine in its
    directory (``ray_current_cluster``) and a plain ``ray.init()`` joins it, even after it stopped:
    kept apart, this cluster is never joined by another run on the machine, during or after."""
    return {"RAY_AUTH_MODE": "token", TOKEN_ENV: token, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": os.path.join(tempfile.gettempdir(), f"retool-ray-{cluster.port}")}


def ray_start_command(cluster: Cluster, gpus: int | None = None, cpus: int | None = None) -> list[str]:
    """``ray start`` for this node: the head on rank 0, a node joining it on the others. ``gpus`` and
    ``cpus`` are what the node offers (default: what Ray detects)."""
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    cmd = [ray, "start", "--block", "--disable-usage-stats"]
    if cluster.rank == 0:
        cmd += ["--head", f"--port={cluster.port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={cluster.head_address}"]
    if cluster.addresses[cluster.rank] not in ("127.0.0.1", "localhost"):  # Ray finds a loopback node's IP itself
        cmd.append(f"--node-ip-address={cluster.addresses[cluster.rank]}")
    if gpus is not None:
        cmd.append(f"--num-gpus={gpus}")
    if cpus is not None:
        cmd.append(f"--num-cpus={cpus}")
    return cmd


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 1.0,
             alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if not alive():
            raise ClusterError(f"{what}: this node's Ray process exited first")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


def alive_nodes(address: str, env: Mapping[str, str]) -> list[dict]:
    """The cluster's live nodes, asked in a short-lived driver (a process of its own, so that this
    process never holds a Ray connection while the trainer runs)."""
    probe = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'resources': n['Resources']} "
             "for n in ray.nodes() if n['Alive']]))" % address)
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**os.environ, **env},
                              timeout=120)
    except subprocess.TimeoutExpired:
        return []  # asked again on the next look
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _start_ray(cluster: Cluster, env: Mapping[str, str], gpus: int | None, cpus: int | None) -> subprocess.Popen:
    cmd = ray_start_command(cluster, gpus, cpus)
    say(cluster, "$ " + " ".join(cmd))
    # its own session: stopping the group stops this node's Ray processes and nothing else
    return subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True,
                            stdout=sys.stderr, stderr=subprocess.STDOUT)


def _stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # the group's other members (raylet, GCS, agents) may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def say(cluster: Cluster, message: str) -> None:
    print(f"[cluster rank {cluster.rank}/{cluster.nodes}] {message}", file=sys.stderr, flush=True)


def run_ray_head(cluster: Cluster, cmd: Sequence[str], token: str, gpus: int | None = None, cpus: int | None = None,
                 join_timeout: float = 600.0, env: Mapping[str, str] | None = None) -> int:
    """Rank 0: start the head, wait for every node, run ``cmd`` against the cluster, stop the head."""
    renv = ray_env(cluster, token)
    ray_proc = _start_ray(cluster, renv, gpus, cpus)
    try:
        alive = lambda: ray_proc.poll() is None  # noqa: E731
        wait_for(lambda: reachable(cluster.head, cluster.port), 120, "the Ray head's port", alive=alive)
        nodes: list[dict] = []

        def all_joined() -> bool:
            nonlocal nodes
            nodes = alive_nodes(cluster.head_address, renv)
            return len(nodes) >= cluster.nodes

        wait_for(all_joined, join_timeout, f"{cluster.nodes} nodes in the Ray cluster", interval=2.0, alive=alive)
        totals = {k: sum(n["resources"].get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
        say(cluster, f"{len(nodes)} nodes joined ({', '.join(f'{v:g} {k}' for k, v in totals.items())}); running the command")
        proc = subprocess.Popen(list(cmd), env={**os.environ, **(env or {}), **renv, "RAY_ADDRESS": cluster.head_address})
        try:
            return proc.wait()
        finally:
            stop_process(proc, grace=30)
    finally:
        _stop_group(ray_proc)
        say(cluster, "Ray head stopped")


def run_ray_worker(cluster: Cluster, token: str, gpus: int | None = None, cpus: int | None = None,
                   join_timeout: float = 600.0, gone_after: float = 10.0) -> int:
    """Ranks > 0: join the head once it answers; leave when it has been unreachable for ``gone_after`` s."""
    try:
        wait_for(lambda: reachable(cluster.head, cluster.port), join_timeout, f"the Ray head at {cluster.head_address}",
                 interval=2.0)
    except ClusterError as err:
        say(cluster, f"error: {err}")
        return 1
    ray_proc = _start_ray(cluster, ray_env(cluster, token), gpus, cpus)
    try:
        lost_since = None
        while ray_proc.poll() is None:
            if reachable(cluster.head, cluster.port):
                lost_since = None
            else:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > gone_after:
                    break
            time.sleep(2.0)
        else:  # this node's Ray ended first: under a live head, it never joined or it crashed
            if reachable(cluster.head, cluster.port):
                say(cluster, f"error: this node's Ray exited ({ray_proc.returncode}) while the head still answers "
                             "(a wrong RAY_AUTH_TOKEN, or a crash: see its output above)")
                return ray_proc.returncode or 1
        say(cluster, "the head is gone; leaving")
        return 0
    finally:
        _stop_group(ray_proc)


def run(cluster: Cluster, launcher: str, cmd: Sequence[str], gpus: int | None = None, cpus: int | None = None,
        token: str | None = None, join_timeout: float = 600.0, env: Mapping[str, str] | None = None) -> int:
    """This node's part of running ``cmd`` across the cluster (see the module's docstring)."""
    if launcher == "torchrun":
        say(cluster, f"torchrun rendezvous at {cluster.head}:{cluster.port}")
        return subprocess.call(list(cmd), env={**os.environ, **(env or {}), **torchrun_env(cluster)})
    if launcher != "ray":
        raise ValueError(f"launcher {launcher!r}: expected one of {LAUNCHERS}")
    token = token or os.environ.get(TOKEN_ENV, "")
    if len(token) < 16:
        raise ClusterError(f"a Ray cluster needs a shared token: set {TOKEN_ENV} to the same secret "
                           "(16 characters or more) on every node")
    if cluster.rank == 0:
        return run_ray_head(cluster, cmd, token, gpus, cpus, join_timeout, env)
    return run_ray_worker(cluster, token, gpus, cpus, join_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m recipe.retool.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", choices=LAUNCHERS, required=True, help="ray (GRPO) or torchrun (SFT)")
    p.add_argument("--rank", type=int, required=True, help="this node's rank, 0 for the head")
    p.add_argument("--addresses", required=True, help="every node's address, comma-separated, rank 0's first")
    p.add_argument("--port", type=int, default=None,
                   help=f"the head's port (default: {RAY_PORT} for ray, {TORCH_PORT} for torchrun)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs this node offers to Ray (default: detected)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs this node offers to Ray (default: detected)")
    p.add_argument("--join-timeout", type=float, default=600.0, help="seconds to wait for the other nodes")
    args = p.parse_args(own)
    if not cmd and (args.launcher == "torchrun" or args.rank == 0):
        p.error("the command to run goes after '--'")
    # a plain `kill` (or a scheduler's) ends the run like Ctrl-C: the finally blocks stop this node's
    # Ray processes and the command, which live in sessions of their own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        port = args.port or (RAY_PORT if args.launcher == "ray" else TORCH_PORT)
        cluster = Cluster(args.rank, tuple(a.strip() for a in args.addresses.split(",") if a.strip()), port)
        return run(cluster, args.launcher, cmd, args.gpus, args.cpus, join_timeout=args.join_timeout)
    except (ValueError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
