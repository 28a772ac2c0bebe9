"""A seeded arithmetic task where the code interpreter is necessary: the ReTool miniature's data.

    python -m recipe.retool.dev.mini_task OUT_DIR [--seed 0] [--sft 3200] [--rl 512] [--test 64] [--tool-share 0.5]

Problems have integer answers a small model cannot compute in its head but can with a one-line
program: products of multi-digit numbers, squares and cubes, modular powers and digit sums of powers. The generator writes them in the *source formats* of the real data, so the
recipe's own converters (:mod:`recipe.retool.data`), prefilter and verl's datasets read them
unchanged:

- ``retool_sft.jsonl`` — ReTool-SFT traces (``<code>``/``<interpreter>``/``<answer>`` inside the
  assistant text). Only ``--tool-share`` of them use the interpreter; the rest answer "by hand",
  as a base model would, which a small model cannot do reliably. That leaves room for RL: SFT
  teaches both behaviours, and only the reward can tell the model which one pays.
- ``dapo_math.jsonl`` — DAPO-Math-17k rows (the "Answer:" wrapper included) for the RL prompts.
- ``aime.jsonl`` — AIME-style rows (``ID``, ``Problem``, ``Answer``): the held-out test split.

The three splits are disjoint (no problem text appears in two of them), and the same seed always
writes the same files. The RL and test prompts carry no tool instructions of their own: as in the
real recipe, the chat template renders the tool schema at rollout and evaluation time.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recipe.retool.data import INSTRUCTION


@dataclass(frozen=True)
class Problem:
    kind: str
    text: str
    code: str
    answer: int


# Each problem states its computation in Python's notation, and the program repeats it: copying a
# span is what a small model learns first, computing the value is what it cannot do. Answers stay
# below 1000 (a remainder, a digit sum), so that reading the interpreter's output back is short too.
def _product(r: random.Random) -> Problem:
    a, b = r.randint(10, 99), r.randint(100, 999)
    return Problem("product", f"Compute {a} * {b} % 997.", f"print({a} * {b} % 997)", a * b % 997)


def _power(r: random.Random) -> Problem:
    a, e = r.randint(11, 999), r.randint(2, 3)
    return Problem("power", f"Compute {a} ** {e} % 997.", f"print({a} ** {e} % 997)", a**e % 997)


def _modpow(r: random.Random) -> Problem:
    a, e, m = r.randint(2, 99), r.randint(10, 99), r.randint(11, 99)
    return Problem("modpow", f"Compute pow({a}, {e}, {m}), the remainder of {a} ** {e} divided by {m}.",
                   f"print(pow({a}, {e}, {m}))", pow(a, e, m))


def _digitsum(r: random.Random) -> Problem:
    a, e = r.randint(11, 199), r.randint(5, 12)
    return Problem("digitsum", f"Compute the sum of the digits of {a} ** {e}.",
                   f"print(sum(map(int, str({a} ** {e}))))", sum(int(d) for d in str(a**e)))


KINDS: dict[str, Callable[[random.Random], Problem]] = {
    "product": _product, "power": _power, "modpow": _modpow, "digitsum": _digitsum,
}


def generate(seed: int, counts: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint splits of distinct problems, kinds in turn (so every split covers every kind).

    A kind whose problems run out (200 duplicate draws in a row) is left out from then on; asking
    for more problems than all kinds hold together is an error, never an endless loop.
    """
    r = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    live = list(KINDS)
    turn = 0
    for split, n in counts.items():
        out: list[Problem] = []
        while len(out) < n:
            if not live:
                raise ValueError(f"asked for {sum(counts.values())} distinct problems; the task holds only {len(seen)}")
            kind = live[turn % len(live)]
            for _ in range(200):
                p = KINDS[kind](r)
                if p.text not in seen:
                    seen.add(p.text)
                    out.append(p)
                    turn += 1
                    break
            else:
                live.remove(kind)
        splits[split] = out
    return splits


def sft_trace(p: Problem, use_tool: bool) -> dict:
    """One ReTool-SFT row. The user turn carries the recipe's instruction, as the RL prompts do."""
    if use_tool:
        reply = (f"Let me compute this with Python.\n\n<code>\n```python\n{p.code}\n```\n</code>\n"
                 f"<interpreter>\n{p.answer}\n</interpreter>\n\nThe answer is {p.answer}.\n\n"
                 f"<answer>\n\\boxed{{{p.answer}}}\n</answer>")
    else:
        reply = f"I can work this out by hand.\n\nThe answer is {p.answer}.\n\n<answer>\n\\boxed{{{p.answer}}}\n</answer>"
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{p.text}"},
                         {"role": "assistant", "content": reply}]}


def dapo_row(p: Problem, i: int) -> dict:
    wrapped = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
               f"{p.text}\n\nRemember to put your answer on its own line after \"Answer:\".")
    return {"data_source": "mini_arith", "prompt": [{"role": "user", "content": wrapped}], "ability": "MATH",
            "reward_model": {"ground_truth": str(p.answer), "style": "rule"}, "extra_info": {"index": f"mini-{i}"}}


def aime_row(p: Problem, i: int) -> dict:
    return {"ID": f"mini-test-{i}", "Problem": p.text, "Solution": p.code, "Answer": p.answer}


def write_sources(out_dir: str | Path, seed: int = 0, sft: int = 3200, rl: int = 512, test: int = 64,
                  tool_share: float = 0.5) -> dict[str, str]:
    """Write the three source files; returns {"sft", "rl", "aime24"} → path (``prepare_all``'s sources)."""
    if not 0.0 <= tool_share <= 1.0:
        raise ValueError(f"tool_share must be in [0, 1], got {tool_share}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate(seed, {"sft": sft, "rl": rl, "test": test})
    r = random.Random(seed + 1)
    rows = {
        "sft": [sft_trace(p, r.random() < tool_share) for p in splits["sft"]],
        "rl": [dapo_row(p, i) for i, p in enumerate(splits["rl"])],
        "aime24": [aime_row(p, i) for i, p in enumerate(splits["test"])],
    }
    names = {"sft": "retool_sft.jsonl", "rl": "dapo_math.jsonl", "aime24": "aime.jsonl"}
    paths = {}
    for key, items in rows.items():
        path = out / names[key]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(item) + "\n" for item in items))
        tmp.replace(path)
        paths[key] = str(path)
    (out / "task.json").write_text(json.dumps({"seed": seed, "sft": sft, "rl": rl, "test": test,
                                               "tool_share": tool_share, "kinds": list(KINDS)}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.dev.mini_task", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft", type=int, default=3200, help="SFT traces")
    p.add_argument("--rl", type=int, default=512, help="RL prompts")
    p.add_argument("--test", type=int, default=64, help="held-out test problems")
    p.add_argument("--tool-share", type=float, default=0.5, help="share of SFT traces that use the interpreter")
    a = p.parse_args(argv)
    for key, path in write_sources(a.out_dir, a.seed, a.sft, a.rl, a.test, a.tool_share).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
