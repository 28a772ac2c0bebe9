"""Regenerate the bundled sample data in recipe/retool/sample_data/ (deterministic).

The samples are small, made by this project, and written in the *source* formats of the real
datasets (ReTool-SFT conversations with <code>/<interpreter>/<answer> tags, DAPO-Math-17k rows
with its "Answer:" wrapper and repeated prompts, an AIME-style ID/Problem/Solution/Answer table),
so the demo and tests exercise the real conversion code. Every answer and every interpreter
output is computed by running the code shown.

    python scripts/lab/make_sample_data.py
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "recipe" / "retool" / "sample_data"

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def families(rng: random.Random):
    """Yield (problem, code, answer) triples from a few parametrised problem families."""
    while True:
        k, n = rng.randint(3, 9), rng.randint(100, 999)
        yield (f"What is the sum of all positive integers less than {n} that are divisible by {k}?",
               f"print(sum(range({k}, {n}, {k})))", sum(range(k, n, k)))
        m = rng.randint(200, 5000)
        yield (f"How many positive divisors does {m} have?",
               f"n = {m}\nprint(sum(1 for d in range(1, n + 1) if n % d == 0))",
               sum(1 for d in range(1, m + 1) if m % d == 0))
        a, b, mod = rng.randint(2, 19), rng.randint(50, 500), rng.choice([7, 11, 13, 997, 1000])
        yield (f"Find the remainder when ${a}^{{{b}}}$ is divided by ${mod}$.",
               f"print(pow({a}, {b}, {mod}))", pow(a, b, mod))
        n2, m2 = rng.randint(100, 900), rng.choice([6, 10, 12, 15, 30])
        yield (f"How many integers $x$ with $1 \\le x \\le {n2}$ satisfy $\\gcd(x, {m2}) = 1$?",
               f"from math import gcd\nprint(sum(1 for x in range(1, {n2} + 1) if gcd(x, {m2}) == 1))",
               sum(1 for x in range(1, n2 + 1) if math.gcd(x, m2) == 1))
        e = rng.randint(30, 120)
        yield (f"What is the sum of the digits of $2^{{{e}}}$?",
               f"print(sum(int(c) for c in str(2**{e})))", sum(int(c) for c in str(2**e)))
        c2 = rng.randint(3, 12)
        yield (f"Let $x$ be the positive real root of $x^2 - {c2}x - 1 = 0$. Find $\\lfloor 100x \\rfloor$.",
               f"import sympy as sp\nx = sp.symbols('x')\nr = max(sp.solve(x**2 - {c2}*x - 1, x), key=lambda s: float(s))\n"
               "print(sp.floor(100 * r))",
               math.floor(100 * (c2 + math.sqrt(c2 * c2 + 4)) / 2))


def run(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<sample>", "exec"), {"__name__": "__main__"})
    return buf.getvalue().strip()


def sft_conversation(problem: str, code: str, answer: int, rng: random.Random) -> dict:
    output = run(code)
    assert output == str(answer), (problem, output, answer)
    check = f"print({answer} % 1000)"
    steps = [
        "Let me compute this directly with Python rather than by hand.\n\n"
        f"<code>\n```python\n{code}\n```\n</code>\n<interpreter>\n{output}\n</interpreter>\n\n",
    ]
    if rng.random() < 0.5:  # some conversations make a second, checking call
        steps.append(
            f"The computation gives {output}. As a sanity check, its value mod 1000 is:\n\n"
            f"<code>\n```python\n{check}\n```\n</code>\n<interpreter>\n{run(check)}\n</interpreter>\n\n"
        )
    steps.append(f"So the answer is {answer}.\n\n<answer>\n\\boxed{{{answer}}}\n</answer>")
    return {"messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": "".join(steps)}]}


def main() -> None:
    rng = random.Random(20241124)
    gen = families(rng)
    items = [next(gen) for _ in range(60)]
    OUT.mkdir(parents=True, exist_ok=True)

    with (OUT / "retool_sft_sample.jsonl").open("w") as fh:
        for problem, code, answer in items[:24]:
            fh.write(json.dumps(sft_conversation(problem, code, answer, rng)) + "\n")

    dapo = items[24:48]
    rows = []
    for i, (problem, _, answer) in enumerate(dapo):
        rows.append({
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}],
            "ability": "MATH",
            "reward_model": {"ground_truth": str(answer), "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"sample-{i:04d}"},
        })
    rows += [dict(r) for r in rows[:8]]  # the public file repeats prompts; so does the sample
    with (OUT / "dapo_math_sample.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")

    with (OUT / "aime_sample.jsonl").open("w") as fh:
        for i, (problem, code, answer) in enumerate(items[48:60]):
            fh.write(json.dumps({"ID": f"sample-{i + 1}", "Problem": problem,
                                 "Solution": f"Compute it: `{code}`.", "Answer": int(answer)}) + "\n")
    print(f"wrote samples to {OUT}")


if __name__ == "__main__":
    main()
