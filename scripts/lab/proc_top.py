"""Which processes use the CPU, for machines without ``ps``/``top`` (reads /proc).

    python scripts/lab/proc_top.py [--interval 5] [--top 12]

Prints the load average and the processes that used the most CPU over the interval (percent of
one core), with their command lines.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def cpu_ticks() -> dict[int, tuple[int, str]]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(d.name)] = (int(fields[11]) + int(fields[12]), cmd[:160])
        except (OSError, ValueError, IndexError):
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    hz = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks()
    time.sleep(args.interval)
    after = cpu_ticks()
    rows = sorted(((after[pid][0] - before[pid][0], pid, after[pid][1]) for pid in after if pid in before), reverse=True)
    print(f"loadavg {Path('/proc/loadavg').read_text().strip()}  cores {os.cpu_count()}")
    for ticks, pid, cmd in rows[: args.top]:
        print(f"{100 * ticks / hz / args.interval:6.1f}%  {pid:>7}  {cmd}")


if __name__ == "__main__":
    main()
