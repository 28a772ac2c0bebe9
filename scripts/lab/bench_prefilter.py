"""Prefilter throughput: parallel workers vs one worker, on a DAPO-17k-sized synthetic RL file.

    python scripts/lab/bench_prefilter.py [--rows 17000] [--workers N] [--tokenizer PATH]

Builds the input from the bundled sample problems (repeated with varied numbers and lengths),
tokenizes with the offline dev tokenizer unless --tokenizer is given, runs the real prefilter
twice in this one process (1 worker, then N), and prints rows/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path

from recipe.retool.data import code_tool_name, rl_row, write_parquet
from recipe.retool.dev.tokenizer import save_dev_tokenizer
from recipe.retool.prefilter_dataset import prefilter


def synthetic_rl_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "let the integer sum of all positive divisors modulo prime triangle area point circle".split()
    tool = code_tool_name()
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))
        problem = f"Problem {i}: {body} with $n = {rng.randint(1, 10**6)}$. Find the answer."
        rows.append(rl_row(problem, str(rng.randint(0, 999)), "synthetic", i, "train", tool))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=17_000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = args.tokenizer or str(save_dev_tokenizer(Path(tmp) / "tok"))
        src = Path(tmp) / "in.parquet"
        write_parquet(synthetic_rl_rows(args.rows), src)
        results = {}
        for workers in (1, args.workers):
            r = prefilter(src, Path(tmp) / f"out{workers}.parquet", tok, max_prompt_tokens=512,
                          workers=workers, progress=False)
            results[workers] = r
            print(f"workers={workers:<3d} {args.rows / r.seconds:9.0f} rows/s  ({r.seconds:.2f}s, kept {r.kept}, dropped {r.dropped})")
        one, many = results[1], results[args.workers]
        assert (one.prompt_lengths == many.prompt_lengths).all(), "parallel and serial lengths differ"
        print(f"speed-up {args.workers} workers vs 1: {one.seconds / many.seconds:.2f}x on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
