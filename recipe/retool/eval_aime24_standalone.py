"""AIME24 evaluation with tool use: pass@1 … pass@32 against any OpenAI-compatible server + a sandbox.

    python -m recipe.retool.eval_aime24_standalone --model MODEL --output results/aime24.json \\
        [--base-url http://localhost:8000/v1] [--sandbox-url http://localhost:8080] [--data FILE.parquet]
    ./recipe/retool/evaluate_model.sh MODEL OUTPUT [BASE_URL] [SANDBOX_URL] [API_KEY]

Each sample is a conversation of up to ``--max-turns`` model turns: when the model calls the code
interpreter (native OpenAI ``tool_calls`` or hermes ``<tool_call>`` text, whichever the server
returns), the code runs on the sandbox and its output goes back as a ``tool`` message. The final
answer is scored by :mod:`recipe.retool.reward` (the same code as the RL reward).

Every finished sample is appended to ``OUTPUT.samples.jsonl``; rerunning with the same output
resumes and never repeats a finished sample. Server errors and time-outs are retried with backoff
by the ``openai`` client; a sample that still fails is recorded as an error (excluded from pass@k,
counted in ``error_rate``), never as a wrong answer. The summary JSON, and a plot of the pass@k
curve and per-problem solve rates (``OUTPUT.png``), are written at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipe.retool.code_blocks import extract_code, print_last_expression
from recipe.retool.data import DataError, load_code_tool_schema
from recipe.retool.reward import score_answer
from recipe.retool.sandbox.client import SandboxClient

logger = logging.getLogger(__name__)

K_VALUES = (1, 2, 4, 8, 16, 32)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class EvalConfig:
    model: str
    output: str
    base_url: str = "http://localhost:8000/v1"
    sandbox_url: str = "http://localhost:8080"
    api_key: str = "EMPTY"
    data: str | None = None
    samples: int = 32
    max_turns: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 4096
    concurrency: int = 64
    code_timeout: float = 30.0
    code_memory_mb: int = 1024
    max_tool_output_chars: int = 4096
    request_timeout: float = 600.0
    max_retries: int = 4
    limit: int | None = None  # only the first N problems (smoke runs)


@dataclass
class Sample:
    problem: int
    sample: int
    status: str = "ok"  # ok | error
    correct: bool = False
    pred: str | None = None
    turns: int = 0
    tool_calls: int = 0
    code_errors: int = 0
    code_timeouts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    seconds: float = 0.0
    transcript: list[dict[str, Any]] = field(default_factory=list)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem (n samples, c correct): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_problems(path: str) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read parquet: {exc}") from exc
    for col in ("prompt", "reward_model"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column '{col}' (expected the RL parquet schema from recipe.retool.data)")
    problems = []
    for i, row in df.iterrows():
        prompt = [dict(m) for m in row["prompt"]]
        truth = row["reward_model"].get("ground_truth") if isinstance(row["reward_model"], dict) else None
        if not prompt or truth in (None, ""):
            raise DataError(f"{path}, row {i}: expected a non-empty 'prompt' and 'reward_model.ground_truth'")
        problems.append({"index": int(i), "prompt": prompt, "answer": str(truth),
                         "data_source": row.get("data_source", "unknown")})
    return problems


def parse_tool_calls(message) -> tuple[list[dict[str, Any]], str]:
    """Tool calls from an assistant message: native ``tool_calls`` first, hermes text otherwise.

    Returns ([{id, name, code}], visible content).
    """
    content = message.content or ""
    calls = []
    for call in message.tool_calls or []:
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            args = {"code": call.function.arguments}
        calls.append({"id": call.id, "name": call.function.name, "code": args.get("code", "")})
    if calls:
        return calls, content
    for j, m in enumerate(_HERMES.finditer(content)):
        try:
            obj = json.loads(m.group(1))
            code = (obj.get("arguments") or {}).get("code", "")
            name = obj.get("name", "")
        except (json.JSONDecodeError, AttributeError):
            code, name = "", "invalid"
        calls.append({"id": f"call_{j}", "name": name, "code": code})
    return calls, content


class Evaluator:
    def __init__(self, cfg: EvalConfig, client=None, sandbox: SandboxClient | None = None):
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.client = client or AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key,
                                            timeout=cfg.request_timeout, max_retries=cfg.max_retries)
        self.sandbox = sandbox or SandboxClient(cfg.sandbox_url, max_concurrency=cfg.concurrency)
        self.tools = [load_code_tool_schema()]
        self.tool_name = self.tools[0]["function"]["name"]
        self._llm_slots = asyncio.Semaphore(cfg.concurrency)

    async def aclose(self) -> None:
        await self.client.close()
        await self.sandbox.aclose()

    async def _chat(self, messages: list[dict[str, Any]]):
        async with self._llm_slots:
            return await self.client.chat.completions.create(
                model=self.cfg.model, messages=messages, tools=self.tools, temperature=self.cfg.temperature,
                top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens)

    async def run_sample(self, problem: dict[str, Any], sample_idx: int) -> Sample:
        s = Sample(problem=problem["index"], sample=sample_idx)
        messages = [dict(m) for m in problem["prompt"]]
        start = time.perf_counter()
        transcript: list[str] = []  # rendered like the RL response, so the reward sees the same shape
        try:
            for _ in range(self.cfg.max_turns):
                resp = await self._chat(messages)
                s.turns += 1
                if resp.usage:
                    s.prompt_tokens += resp.usage.prompt_tokens or 0
                    s.completion_tokens += resp.usage.completion_tokens or 0
                choice = resp.choices[0]
                s.finish_reason = choice.finish_reason
                calls, content = parse_tool_calls(choice.message)
                transcript.append(content)
                if not calls:
                    messages.append({"role": "assistant", "content": content})
                    break
                messages.append({"role": "assistant", "content": content, "tool_calls": [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": json.dumps({"code": c["code"]})}} for c in calls]})
                for c in calls:
                    text = await self._run_tool(c, s)
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": text})
                    transcript.append(f"<tool_response>\n{text}\n</tool_response>")
            s.correct, s.pred = score_answer("\n".join(transcript), problem["answer"])
        except Exception as exc:  # openai's retries are exhausted: an error, not a wrong answer
            s.status, s.error = "error", f"{type(exc).__name__}: {exc}"[:500]
        s.seconds = time.perf_counter() - start
        s.transcript = messages[len(problem["prompt"]):]
        return s

    async def _run_tool(self, call: dict[str, Any], s: Sample) -> str:
        s.tool_calls += 1
        if call["name"] != self.tool_name:
            s.code_errors += 1
            return f"Error: unknown tool '{call['name']}'; available: {self.tool_name}"
        code = print_last_expression(extract_code(call["code"] or ""))
        if not code.strip():
            s.code_errors += 1
            return "Error: the code_interpreter needs a non-empty 'code' argument."
        res = await self.sandbox.run_code(code, run_timeout=self.cfg.code_timeout, memory_limit_mb=self.cfg.code_memory_mb)
        if res.timed_out:
            s.code_timeouts += 1
        if not res.ok:
            s.code_errors += 1
        return res.as_tool_text(self.cfg.max_tool_output_chars, timeout_s=self.cfg.code_timeout)


def samples_path(output: str) -> Path:
    return Path(str(output).removesuffix(".json") + ".samples.jsonl")


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write) so appended records start on a line of their own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        data = path.read_bytes()
        fh.truncate(data.rfind(b"\n") + 1)


def load_finished(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    """Finished samples from an earlier run; a torn last line (killed mid-write) is ignored."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open() as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("status") == "ok":
                done[(rec["problem"], rec["sample"])] = rec
    return done


def summarize(cfg: EvalConfig, problems: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    by_problem: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_problem[r["problem"]].append(r)
    ok = [r for r in records if r["status"] == "ok"]
    per_problem, pass_k = [], defaultdict(list)
    for p in problems:
        rs = [r for r in by_problem.get(p["index"], []) if r["status"] == "ok"]
        n, c = len(rs), sum(r["correct"] for r in rs)
        preds: dict[str, int] = defaultdict(int)
        for r in rs:
            preds[r["pred"] or ""] += 1
        per_problem.append({"index": p["index"], "answer": p["answer"], "n": n, "correct": c,
                            "solve_rate": c / n if n else None,
                            "errors": sum(r["status"] != "ok" for r in by_problem.get(p["index"], [])),
                            "top_preds": sorted(preds.items(), key=lambda kv: -kv[1])[:5]})
        for k in K_VALUES:
            if n >= k:
                pass_k[k].append(pass_at_k(n, c, k))
    calls = sum(r["tool_calls"] for r in ok)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "num_problems": len(problems),
        "num_samples": len(records),
        # pass@k in percent, averaged over problems with at least k finished samples
        "pass_at_k": {f"pass@{k}": round(100 * mean(v), 2) for k, v in sorted(pass_k.items())},
        "mean_turns": round(mean([r["turns"] for r in ok]), 3),
        "mean_tool_calls": round(mean([r["tool_calls"] for r in ok]), 3),
        "code_error_rate": round(sum(r["code_errors"] for r in ok) / calls, 4) if calls else 0.0,
        "code_timeout_rate": round(sum(r["code_timeouts"] for r in ok) / calls, 4) if calls else 0.0,
        "error_rate": round(1 - len(ok) / len(records), 4) if records else 0.0,
        "tokens": {"prompt": sum(r["prompt_tokens"] for r in records),
                   "completion": sum(r["completion_tokens"] for r in records)},
        "per_problem": per_problem,
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    ks = [int(k.split("@")[1]) for k in summary["pass_at_k"]]
    a.plot(ks, list(summary["pass_at_k"].values()), marker="o")
    a.set_xscale("log", base=2)
    a.set_xlabel("k")
    a.set_ylabel("pass@k (%)")
    a.set_title(f"{summary['config']['model']}: pass@k")
    a.grid(alpha=0.3)
    rates = [p["solve_rate"] or 0.0 for p in summary["per_problem"]]
    b.bar(range(len(rates)), rates)
    b.set_xlabel("problem")
    b.set_ylabel("solve rate")
    b.set_ylim(0, 1)
    b.set_title("per-problem solve rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def evaluate(cfg: EvalConfig, evaluator: Evaluator | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    if cfg.data is None:
        raise DataError("no --data given (an RL-schema parquet, e.g. data/rl/aime24.parquet)")
    problems = load_problems(cfg.data)[: cfg.limit]
    out_path = Path(cfg.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = samples_path(cfg.output)
    repair_jsonl(jsonl)
    done = load_finished(jsonl)
    todo = [(p, j) for p in problems for j in range(cfg.samples) if (p["index"], j) not in done]
    logger.info("%d problems × %d samples: %d finished earlier, %d to run", len(problems), cfg.samples,
                len(done), len(todo))
    own_evaluator = evaluator is None
    evaluator = evaluator or Evaluator(cfg)
    records = list(done.values())
    bar = tqdm(total=len(problems) * cfg.samples, initial=len(done), desc="samples", unit="sample")
    correct = sum(r["correct"] for r in records)
    finished_ok = len(records)
    queue: asyncio.Queue = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    with jsonl.open("a") as fh:
        async def worker() -> None:
            nonlocal correct, finished_ok
            while True:
                try:
                    p, j = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                s = await evaluator.run_sample(p, j)
                rec = asdict(s)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                records.append(rec)
                if s.status == "ok":
                    finished_ok += 1
                    correct += s.correct
                bar.update(1)
                bar.set_postfix(pass1=f"{100 * correct / max(finished_ok, 1):.1f}%",
                                errors=len(records) - finished_ok)

        # more conversations than LLM slots, so a conversation waiting on the sandbox never idles a slot
        try:
            await asyncio.gather(*(worker() for _ in range(min(len(todo), 2 * cfg.concurrency) or 1)))
        finally:
            if own_evaluator:
                await evaluator.aclose()
    bar.close()
    latest: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:  # a retried error is superseded by its later record
        key = (r["problem"], r["sample"])
        if key not in latest or r["status"] == "ok":
            latest[key] = r
    summary = summarize(cfg, problems, list(latest.values()))
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_path)
    plot(summary, out_path.with_suffix(".png"))
    return summary


def _parse(argv: Sequence[str] | None) -> EvalConfig:
    d = EvalConfig(model="", output="")
    p = argparse.ArgumentParser(prog="python -m recipe.retool.eval_aime24_standalone", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--output", required=True, help="summary JSON path (samples go to OUTPUT.samples.jsonl)")
    p.add_argument("--data", default=None, help="RL-schema parquet (default: prepare AIME-2024 from the hub)")
    for name, value in asdict(d).items():
        if name in ("model", "output", "data"):
            continue
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value) if value is not None else int, default=value, help=f"default {value}")
    args = vars(p.parse_args(argv))
    return EvalConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = _parse(argv)
    try:
        if cfg.data is None:
            from recipe.retool.data import DEFAULT_SOURCES, prepare_val

            cfg.data = str(Path(cfg.output).parent / "aime24.parquet")
            if not Path(cfg.data).exists():
                prepare_val(DEFAULT_SOURCES["aime24"], cfg.data, data_source="aime24")
        summary = asyncio.run(evaluate(cfg))
    except DataError as err:
        logger.error("%s", err)
        return 2
    print(json.dumps({k: summary[k] for k in ("pass_at_k", "mean_turns", "mean_tool_calls", "code_error_rate",
                                              "error_rate", "tokens")}, indent=2))
    print(f"wrote {cfg.output}, {samples_path(cfg.output)} and {Path(cfg.output).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
