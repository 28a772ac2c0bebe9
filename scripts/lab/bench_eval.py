"""Evaluation-harness efficiency: does it keep the allowed LLM concurrency busy, and what does it cost?

    python scripts/lab/bench_eval.py [--problems 30] [--samples 32] [--concurrency 64] [--delay 0.2]

Runs the real harness against the scripted OpenAI-compatible stand-in (tests/stub_openai_server.py)
and our real sandbox server, twice in one run:

- with a fixed model latency (--delay): utilisation = time-averaged requests in flight at the model
  server / allowed concurrency (target ≥ 95%), and wall time against the ideal
  (LLM calls × delay / concurrency);
- with an instant model: the harness's own cost per sample (wall and CPU), sandbox calls included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


STUB = REPO / "tests" / "stub_openai_server.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=int, default=30)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--delay", type=float, default=1.0, help="stand-in model latency per call, seconds")
    args = p.parse_args()

    from recipe.retool.data import rl_row, write_parquet
    from recipe.retool.evaluate import EvalConfig, evaluate
    from recipe.retool.processes import LocalSandbox, free_port, wait_until_healthy

    sandbox = LocalSandbox(workers=None, cwd=str(REPO)).wait()
    sandbox_url = sandbox.url
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "problems.parquet"
            write_parquet([rl_row(f"Bench problem {i}: compute.", str(i), "bench", i, "test", "code_interpreter")
                           for i in range(args.problems)], data)
            n = args.problems * args.samples
            print(f"{args.problems} problems × {args.samples} samples = {n} samples, 2 model calls + 1 sandbox "
                  f"call each, concurrency {args.concurrency}")
            for delay in (args.delay, 0.0):
                spec = {"answers": {f"Bench problem {i}:": [str(i), args.samples // 2] for i in range(args.problems)},
                        "delay": delay}
                llm_port = free_port()
                # the stand-in runs in its own process, so this process measures the harness alone
                llm = subprocess.Popen([sys.executable, str(STUB), str(llm_port), json.dumps(spec)])
                llm_url = f"http://127.0.0.1:{llm_port}"
                wait_until_healthy(llm_url + "/stats", 120, llm, "stand-in model server")
                cfg = EvalConfig(model="stub", output=str(Path(tmp) / f"out{delay}.json"), base_url=llm_url + "/v1",
                                 sandbox_url=sandbox_url, data=str(data), samples=args.samples,
                                 concurrency=args.concurrency)
                cpu0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                summary = asyncio.run(evaluate(cfg))
                wall = time.perf_counter() - t0
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                stats = httpx.get(llm_url + "/stats").json()
                llm.terminate()
                llm.wait(10)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                span, busy = stats["span"], stats["busy_integral"]
                util = busy / (args.concurrency * span)
                assert summary["pass_at_k"]["pass@1"] == 50.0, summary["pass_at_k"]
                if delay:
                    ideal = 2 * n * delay / args.concurrency
                    print(f"model latency {delay * 1000:.0f} ms: wall {wall:.1f}s vs ideal {ideal:.1f}s "
                          f"({ideal / wall:.1%}), mean in-flight {busy / span:.1f} of "
                          f"{args.concurrency} → utilisation {util:.1%}")
                else:
                    print(f"instant model: {n / wall:.0f} samples/s, {1000 * wall / n:.2f} ms wall and "
                          f"{1000 * cpu / n:.2f} ms harness CPU per sample (stand-in and sandbox in their own processes)")
    finally:
        sandbox.stop()


if __name__ == "__main__":
    main()
