#!/usr/bin/env bash
# Run a command beside a sandbox server started in a cgroup v2 of its own (development tool, root).
#
#   scripts/lab/with_sandbox_cgroup.sh WORKERS FRONTS PORT COMMAND [ARGS...]
#
# cgroup v2 lets a cgroup either hold processes or enable controllers for its children, not both. A
# shell inside a container often shares its cgroup with other processes, where the server cannot give
# each slot a memory budget (it refuses to start without --allow-unsafe). This script moves every
# process of the current cgroup into a `host` child, enables `memory` (and `pids`, when offered) for
# the children, starts
# `python3 -m recipe.retool.sandbox serve` in an `srv` child, waits until it answers, and runs
# COMMAND with SANDBOX_URL and SANDBOX_PID set (the server stops when COMMAND ends). Rerunning it is
# fine. The server's log: $SANDBOX_LOG (default sandbox.log).
#
#   scripts/lab/with_sandbox_cgroup.sh 32 4 18080 sh -c \
#       'python3 scripts/lab/bench_sandbox.py --url $SANDBOX_URL --server-pid $SANDBOX_PID --clients 4'
set -euo pipefail
workers=${1:?workers}; fronts=${2:?fronts}; port=${3:?port}; shift 3
cd "$(dirname "$0")/../.."  # the project root: `python3 -m recipe.retool.sandbox` from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log=${SANDBOX_LOG:-sandbox.log}
[ -f /sys/fs/cgroup/cgroup.controllers ] || { echo "no cgroup v2 at /sys/fs/cgroup: start the server directly"; exit 2; }
cg=/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)
case $cg in */host) cg=${cg%/host} ;; esac  # a second run starts where the first one left this shell's parent
srv=$cg/srv-$$  # a fresh one: an earlier server left controllers enabled in its own
mkdir -p "$cg/host" "$srv"
for p in $(cat "$cg/cgroup.procs"); do echo "$p" > "$cg/host/cgroup.procs" 2>/dev/null || true; done
for c in memory pids; do
  if grep -qw $c "$cg/cgroup.controllers" && ! grep -qw $c "$cg/cgroup.subtree_control"; then
    echo +$c > "$cg/cgroup.subtree_control"
  fi
done
(echo "$BASHPID" > "$srv/cgroup.procs"
 exec python3 -m recipe.retool.sandbox serve --workers "$workers" --fronts "$fronts" --port "$port") > "$log" 2>&1 &
server=$!
stop() {
  kill "$server" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$server" 2>/dev/null || true
  # the server removes its own directories; then its leaf and ours go (best effort)
  for d in "$srv"/*/ "$srv"; do rmdir "$d" 2>/dev/null || true; done
}
trap stop EXIT
for _ in $(seq 300); do
  curl -sf -m 10 "http://127.0.0.1:$port/v1/ping" > /dev/null && break  # open without a token
  kill -0 $server 2>/dev/null || { echo "the sandbox server exited; its log:"; tail -30 "$log"; exit 1; }
  sleep 1
done
curl -sf -m 10 "http://127.0.0.1:$port/v1/ping" > /dev/null || { echo "the sandbox server did not answer; its log:"; tail -30 "$log"; exit 1; }
export SANDBOX_URL="http://127.0.0.1:$port" SANDBOX_PID=$server RETOOL_SANDBOX_URL="http://127.0.0.1:$port"
"$@"
