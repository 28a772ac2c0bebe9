"""Where a request's time goes, from two ``/health`` snapshots of the pool: the wait for a worker, the
round trip to it, and the worker's own stages (what ``scripts/lab/bench_sandbox.py`` prints)."""

from __future__ import annotations

STAGES = ("prepare", "limits", "fork", "run", "run_end", "cleanup")


def stage_means_ms(before: dict, after: dict) -> dict[str, float] | None:
    """Mean milliseconds per request of each stage between two ``pool_stats`` snapshots: the wait
    for a worker, the round trip to it, and the worker's own stages."""
    totals = {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int)}
    n = totals.get("timed_requests", 0)
    if n <= 0:
        return None
    means = {"queue": totals.get("queue_wait_ms_total", 0) / n, "round_trip": totals.get("round_trip_us_total", 0) / n / 1e3}
    for stage in STAGES:
        means[stage] = totals.get(f"stage_{stage}_us_total", 0) / n / 1e3
    means["pipes_loop"] = means["round_trip"] - sum(means[s] for s in STAGES)
    means["requests"] = n
    # how the kernel spread the connections' requests over the fronts (all fronts share the workers)
    old = before.get("requests_by_front") or []
    means["per_front"] = [v - (old[i] if i < len(old) else 0) for i, v in enumerate(after.get("requests_by_front") or [])]
    return means


def format_stages(m: dict[str, float]) -> str:
    parts = " + ".join(f"{s} {m[s]:.2f}" for s in (*STAGES, "pipes_loop"))
    line = f"{'':14s}ms per request (mean of {m['requests']}): queue {m['queue']:.2f} | worker round trip {m['round_trip']:.2f} = {parts}"
    if len(m.get("per_front", [])) > 1:
        line += f" | requests per front {'/'.join(map(str, m['per_front']))}"
    return line
