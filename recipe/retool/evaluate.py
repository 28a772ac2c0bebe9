"""AIME24 evaluation with tool use: pass@1 … pass@32 against any OpenAI-compatible server + a sandbox.

    python -m recipe.retool.evaluate --model MODEL --output results/aime24.json \\
        [--base-url MODEL_SERVER_URL] [--sandbox-url SANDBOX_URL] [--data FILE.parquet]
    ./recipe/retool/evaluate_model.sh MODEL OUTPUT [BASE_URL] [SANDBOX_URL] [API_KEY] [more flags]

Each sample is a conversation of up to ``--max-turns`` model turns: when the model calls the code
interpreter (native OpenAI ``tool_calls`` or hermes ``<tool_call>`` text, whichever the server
returns), the code runs on the sandbox and its output goes back as a ``tool`` message.
``--no-tools`` evaluates text only: no tools are offered, a tool call in the text is not run.

Sampling and budgets come from the GRPO config that trained the model (``--config``, default
``retool_grpo_template``; ``--config-override key=value`` as given to the trainer), so this pass@1 is
the one verl's validation measures: temperature and top-p from ``rollout.val_kwargs``, the response
budget from ``data.max_response_length``, turns from ``multi_turn.max_assistant_turns``, tool output
from ``multi_turn.max_tool_response_length``. A flag overrides its setting. ``--max-tokens`` is the *total* response budget of a sample across all turns, counted like verl
counts the response — every token after the prompt, model output and tool outputs alike (from the
server's ``usage``). Each request asks for what is left; tool outputs not yet counted by the server
are charged at an upper bound (characters + 16). A call on the last allowed turn is not run.

The answer is the last assistant message, scored by :func:`recipe.retool.reward.score_answer` —
the rule the RL reward uses. Outcomes, per cause:
- the model stops answering, or runs out of turns: scored as written;
- the budget runs out (request cut at the budget, budget spent before a turn, or the server
  rejects the conversation as longer than its context window): scored as written, so almost always
  *wrong*; a sample whose exact count turns out above the budget is wrong;
- server or sandbox failures that outlast the retries (5xx, connection, time-out), other 4xx:
  an *error*, kept out of pass@k, counted wrong in ``accuracy``, reported by cause. The run exits
  non-zero when errors exceed ``--max-error-rate``.

Before starting, one chat request to the model server and one run on the sandbox check that both
answer. Every finished sample is appended to ``OUTPUT.samples.jsonl``; the run's identity (model,
data hash, sampling, turns, budget, tools) goes to ``OUTPUT.run.json``. Rerunning with the same
output resumes (errors are retried) only when the identity matches; ``--allow-resume-mismatch``
overrides. The summary JSON and a plot (``OUTPUT.png``) are written at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from recipe.retool.code_blocks import extract_code, print_last_expression
from recipe.retool.data import DataError, load_code_tool_schema
from recipe.retool.reward import score_answer
from recipe.retool.sandbox.client import SandboxClient
from recipe.retool.settings import DEFAULT_MODEL_URL, DEFAULT_SANDBOX_URL, SANDBOX_TOKEN_ENV

logger = logging.getLogger(__name__)

K_VALUES = (1, 2, 4, 8, 16, 32)
TOOL_MESSAGE_OVERHEAD = 16  # template tokens charged per tool message until the server has counted it
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_HERMES_BLOCK = re.compile(r"\s*<tool_call>.*?</tool_call>", re.DOTALL)
_CONTEXT = re.compile(r"context length|context window|maximum context|max_model_len|too long|is longer than|"
                      r"exceeds? the (?:maximum|model)|maximum (?:allowed )?length|too many tokens", re.IGNORECASE)
IDENTITY_KEYS = ("model", "data_sha256", "temperature", "top_p", "max_turns", "max_tokens", "no_tools",
                 "max_tool_output_chars", "code_timeout")


class EvalError(RuntimeError):
    """A run that cannot start or cannot be trusted (server down, mismatched resume)."""


@dataclass
class EvalConfig:
    model: str
    output: str
    base_url: str = DEFAULT_MODEL_URL
    sandbox_url: str = DEFAULT_SANDBOX_URL
    sandbox_token_env: str = SANDBOX_TOKEN_ENV  # env var with the sandbox's bearer token (unset: none)
    api_key: str = "EMPTY"
    data: str | None = None
    samples: int = 32
    # None: from the GRPO config (``config`` + ``config_overrides``; FROM_GRPO_CONFIG names the keys)
    max_turns: int | None = None  # model turns per sample
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None  # TOTAL response tokens per sample across turns
    concurrency: int = 64  # model requests in flight
    code_timeout: float = 30.0
    code_memory_mb: int = 1024
    max_tool_output_chars: int | None = None
    request_timeout: float = 600.0
    max_retries: int = 4
    limit: int | None = None  # only the first N problems (smoke runs)
    no_tools: bool = False  # text only: no tools offered, tool calls in the text are not run
    max_error_rate: float = 0.02  # fail the run (exit 3) above this fraction of samples in error
    allow_resume_mismatch: bool = False
    preflight: bool = True
    config: str = "retool_grpo_template"  # the GRPO config the evaluation settings default to
    config_overrides: list[str] = field(default_factory=list)

    def resolved(self) -> EvalConfig:
        """This config with every unset sampling and budget setting read from the GRPO config."""
        unset = [name for name in FROM_GRPO_CONFIG if getattr(self, name) is None]
        if not unset:
            return self
        from omegaconf import OmegaConf

        from recipe.retool.train import compose, split_config_arg

        try:
            name, config_dir = split_config_arg(self.config)
            cfg = compose(name, list(self.config_overrides), config_dir)
        except Exception as exc:  # a missing config, a bad override: one line naming what was given
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvalError(f"--config {self.config} {' '.join(self.config_overrides)}".rstrip()
                            + f": cannot read the GRPO config the sampling and budgets default to: {first}") from None
        return replace(self, **{k: OmegaConf.select(cfg, FROM_GRPO_CONFIG[k]) for k in unset})


# evaluation setting → the GRPO config key it defaults to (what verl's validation uses)
FROM_GRPO_CONFIG = {
    "temperature": "actor_rollout_ref.rollout.val_kwargs.temperature",
    "top_p": "actor_rollout_ref.rollout.val_kwargs.top_p",
    "max_tokens": "data.max_response_length",
    "max_turns": "actor_rollout_ref.rollout.multi_turn.max_assistant_turns",
    "max_tool_output_chars": "actor_rollout_ref.rollout.multi_turn.max_tool_response_length",
}


@dataclass
class Sample:
    problem: int
    sample: int
    status: str = "ok"  # ok | error
    stop: str | None = None  # answer | max_turns | budget | context_length | error
    correct: bool = False
    pred: str | None = None
    turns: int = 0
    tool_calls: int = 0
    code_errors: int = 0
    code_timeouts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    response_tokens: int = 0  # verl's count: every token after the prompt (model + tool outputs)
    over_budget: bool = False
    finish_reason: str | None = None
    error_kind: str | None = None  # server | client | sandbox | internal
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


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_tool_calls(message: Any) -> tuple[list[dict[str, Any]], str, bool]:
    """Tool calls from an assistant message: native ``tool_calls`` first, hermes text otherwise.

    Returns ([{id, name, code}], content, native?).
    """
    content = message.content or ""
    calls = []
    for call in message.tool_calls or []:
        try:
            args = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            args = {"code": call.function.arguments}
        code = args.get("code", "") if isinstance(args, dict) else ""
        calls.append({"id": call.id or f"call_{uuid.uuid4().hex[:8]}", "name": call.function.name, "code": code})
    if calls:
        return calls, content, True
    for m in _HERMES.finditer(content):
        try:
            obj = json.loads(m.group(1))
            code = (obj.get("arguments") or {}).get("code", "")
            name = obj.get("name", "")
        except (json.JSONDecodeError, AttributeError):
            code, name = "", "invalid"
        calls.append({"id": f"call_{uuid.uuid4().hex[:8]}", "name": name, "code": code})
    return calls, content, False


def assistant_message(content: str, calls: list[dict[str, Any]], native: bool) -> dict[str, Any]:
    """The assistant turn as it goes back into the history: each call exactly once.

    Native calls go in ``tool_calls`` (and any markup the server left in ``content`` is removed);
    a hermes call the server did not parse stays in ``content`` only, as the model wrote it.
    """
    if not calls or not native:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": _HERMES_BLOCK.sub("", content).strip(), "tool_calls": [
        {"id": c["id"], "type": "function",
         "function": {"name": c["name"], "arguments": json.dumps({"code": c["code"]})}} for c in calls]}


def classify_error(exc: BaseException) -> str:
    """context_length (the model ran out of room: scored) | server | client | internal (errors)."""
    import openai

    if isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 413, 422) and _CONTEXT.search(str(exc)):
        return "context_length"
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                        openai.RateLimitError)):
        return "server"
    if isinstance(exc, openai.APIStatusError):
        return "server" if exc.status_code >= 500 else "client"
    return "internal"


class Evaluator:
    def __init__(self, cfg: EvalConfig, client: Any = None, sandbox: SandboxClient | None = None):
        from openai import AsyncOpenAI

        self.cfg = cfg = cfg.resolved()
        self.client = client or AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key,
                                            timeout=cfg.request_timeout, max_retries=cfg.max_retries)
        self.sandbox = sandbox or SandboxClient(cfg.sandbox_url, max_concurrency=cfg.concurrency,
                                                token=os.environ.get(cfg.sandbox_token_env) or None)
        schema = load_code_tool_schema()
        self.tools = None if cfg.no_tools else [schema]
        self.tool_name = schema["function"]["name"]
        self._llm_slots = asyncio.Semaphore(cfg.concurrency)

    async def aclose(self) -> None:
        await self.client.close()
        await self.sandbox.aclose()

    async def _chat(self, messages: list[dict[str, Any]], max_tokens: int, client: Any = None) -> Any:
        kw: dict[str, Any] = {"tools": self.tools} if self.tools else {}
        async with self._llm_slots:
            return await (client or self.client).chat.completions.create(
                model=self.cfg.model, messages=messages, temperature=self.cfg.temperature,
                top_p=self.cfg.top_p, max_tokens=max_tokens, **kw)

    async def preflight(self) -> None:
        """One chat request and one sandbox run; a clear EvalError when either does not answer."""
        probe = self.client.with_options(max_retries=1)
        try:
            await self._chat([{"role": "user", "content": "Reply with OK."}], max_tokens=1, client=probe)
        except Exception as exc:
            raise EvalError(f"model server {self.cfg.base_url} did not answer a chat request for model "
                            f"'{self.cfg.model}': {type(exc).__name__}: {str(exc)[:300]} — is it running and "
                            f"serving that model name (--model, --base-url)?") from exc
        if self.cfg.no_tools:
            return
        res = await self.sandbox.run_code("print(6 * 7)", run_timeout=self.cfg.code_timeout)
        if not res.ok or res.stdout.strip() != "42":
            detail = res.message or res.stderr or res.stdout or res.status
            hint = (f"it wants a bearer token: set {self.cfg.sandbox_token_env}" if "HTTP 401" in detail
                    else "is it running (--sandbox-url)? --no-tools evaluates without one")
            raise EvalError(f"sandbox {self.cfg.sandbox_url} could not run print(6 * 7): {res.status}: "
                            f"{detail[:300]} — {hint}.")

    async def run_sample(self, problem: dict[str, Any], sample_idx: int) -> Sample:
        s = Sample(problem=problem["index"], sample=sample_idx)
        messages = [dict(m) for m in problem["prompt"]]
        start = time.perf_counter()
        budget = self.cfg.max_tokens
        first_prompt: int | None = None
        pending = 0  # upper bound for tool-output tokens the server has not counted yet
        try:
            for turn in range(1, self.cfg.max_turns + 1):
                left = budget - s.response_tokens - pending
                if left < 1:
                    s.stop = "budget"
                    break
                try:
                    resp = await self._chat(messages, max_tokens=left)
                except Exception as exc:
                    if classify_error(exc) != "context_length":
                        raise
                    s.stop = "context_length"
                    break
                s.turns += 1
                choice = resp.choices[0]
                s.finish_reason = choice.finish_reason
                calls, content, native = parse_tool_calls(choice.message)
                self._count_tokens(s, resp, content, pending, first_prompt)
                if first_prompt is None and resp.usage is not None and resp.usage.prompt_tokens is not None:
                    first_prompt = resp.usage.prompt_tokens
                pending = 0
                if self.cfg.no_tools:
                    calls = []
                messages.append(assistant_message(content, calls, native))
                if s.response_tokens > budget:
                    s.over_budget, s.stop = True, "budget"
                    break
                if choice.finish_reason == "length":
                    s.stop = "budget"
                    break
                if not calls:
                    s.stop = "answer"
                    break
                if turn == self.cfg.max_turns:  # as in training: a call on the last turn is not run
                    s.stop = "max_turns"
                    break
                for c in calls:
                    text = await self._run_tool(c, s)
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": text})
                    pending += len(text) + TOOL_MESSAGE_OVERHEAD
            final = next((m.get("content") or "" for m in reversed(messages) if m["role"] == "assistant"), "")
            correct, s.pred = score_answer(final, problem["answer"])
            s.correct = correct and not s.over_budget
        except _SandboxDown as exc:
            s.status, s.stop, s.error_kind, s.error = "error", "error", "sandbox", str(exc)[:500]
        except Exception as exc:  # retries are exhausted: an error, not a wrong answer
            s.status, s.stop, s.error_kind = "error", "error", classify_error(exc)
            s.error = f"{type(exc).__name__}: {exc}"[:500]
        s.seconds = time.perf_counter() - start
        s.transcript = messages[len(problem["prompt"]):]
        return s

    @staticmethod
    def _count_tokens(s: Sample, resp: Any, content: str, pending: int, first_prompt: int | None) -> None:
        usage = resp.usage
        if usage is None or usage.prompt_tokens is None:  # no usage: characters as an upper bound
            s.completion_tokens += len(content)
            s.response_tokens += pending + len(content)
            return
        s.prompt_tokens += usage.prompt_tokens
        s.completion_tokens += usage.completion_tokens or 0
        base = usage.prompt_tokens if first_prompt is None else first_prompt
        s.response_tokens = usage.prompt_tokens - base + (usage.completion_tokens or 0)

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
        if res.sandbox_error:  # the sandbox client already retried: an infrastructure failure
            raise _SandboxDown(f"sandbox: {res.message}")
        if res.timed_out:
            s.code_timeouts += 1
        if not res.ok:
            s.code_errors += 1
        return res.as_tool_text(self.cfg.max_tool_output_chars, timeout_s=self.cfg.code_timeout)


class _SandboxDown(Exception):
    pass


def samples_path(output: str) -> Path:
    return Path(str(output).removesuffix(".json") + ".samples.jsonl")


def identity_path(output: str) -> Path:
    return Path(str(output).removesuffix(".json") + ".run.json")


def run_identity(cfg: EvalConfig) -> dict[str, Any]:
    assert cfg.data is not None
    values = {**asdict(cfg), "data_sha256": file_sha256(cfg.data)}
    return {k: values[k] for k in IDENTITY_KEYS}


def check_identity(cfg: EvalConfig, identity: dict[str, Any], has_samples: bool) -> list[str]:
    """Compare with the identity recorded at this output; raise on a mismatch unless allowed."""
    path = identity_path(cfg.output)
    old = json.loads(path.read_text()) if path.exists() else None
    if not has_samples:
        return []
    if old is None:
        diffs = [f"{path.name} is missing (samples from an unidentified run)"]
    else:
        diffs = [f"{k}: {old.get(k)!r} -> {identity[k]!r}" for k in IDENTITY_KEYS if old.get(k) != identity[k]]
    if diffs and not cfg.allow_resume_mismatch:
        raise EvalError(f"{samples_path(cfg.output)} holds samples of a different run ({'; '.join(diffs)}); "
                        "use another --output, delete those files to start over, or pass "
                        "--allow-resume-mismatch to merge them anyway")
    if diffs:
        logger.warning("resuming a mismatched run (--allow-resume-mismatch): %s", "; ".join(diffs))
    return diffs


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


def load_records(path: Path) -> list[dict[str, Any]]:
    """Every record of an earlier run; a torn last line (killed mid-write) is ignored."""
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    with path.open() as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def latest_records(records: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, Any]]:
    """One record per (problem, sample): a finished one wins over errors (which a resume retries)."""
    latest: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        key = (r["problem"], r["sample"])
        if key not in latest or r["status"] == "ok":
            latest[key] = r
    return latest


def dominant_error(records: list[dict[str, Any]]) -> str | None:
    errors = Counter(f"[{r.get('error_kind') or 'error'}] {(r.get('error') or '')[:200]}"
                     for r in records if r["status"] != "ok")
    if not errors:
        return None
    text, n = errors.most_common(1)[0]
    return f"{text} ({n} of {sum(errors.values())} errors)"


def summarize(cfg: EvalConfig, problems: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    by_problem: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_problem[r["problem"]].append(r)
    ok = [r for r in records if r["status"] == "ok"]
    errors = [r for r in records if r["status"] != "ok"]
    per_problem, pass_k = [], defaultdict(list)
    for p in problems:
        rs = [r for r in by_problem.get(p["index"], []) if r["status"] == "ok"]
        n, c = len(rs), sum(r["correct"] for r in rs)
        preds: Counter = Counter(r["pred"] or "" for r in rs)
        per_problem.append({"index": p["index"], "answer": p["answer"], "n": n, "correct": c,
                            "solve_rate": c / n if n else None,
                            "errors": sum(r["status"] != "ok" for r in by_problem.get(p["index"], [])),
                            "top_preds": preds.most_common(5)})
        for k in K_VALUES:
            if k <= cfg.samples and n >= k:
                pass_k[k].append(pass_at_k(n, c, k))
    calls = sum(r["tool_calls"] for r in ok)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    error_rate = len(errors) / len(records) if records else 0.0
    ks = [k for k in K_VALUES if k <= cfg.samples]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "budget": {"max_tokens_total_per_sample": cfg.max_tokens, "max_turns": cfg.max_turns,
                   "max_tool_output_chars": cfg.max_tool_output_chars, "tools": not cfg.no_tools,
                   "counting": "every response token after the prompt, model output and tool outputs, "
                               "across all turns (as verl's data.max_response_length)"},
        "sampling": {"samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p},
        "num_problems": len(problems),
        "num_samples": len(records),
        # pass@k in percent, averaged over the problems with at least k scored (non-error) samples
        "pass_at_k": {f"pass@{k}": round(100 * mean(pass_k[k]), 2) for k in ks if pass_k[k]},
        "pass_at_k_coverage": {f"pass@{k}": {"problems": len(pass_k[k]), "of": len(problems)} for k in ks},
        # percent of ALL samples correct: errors count as wrong here
        "accuracy": round(100 * sum(r["correct"] for r in records) / len(records), 2) if records else 0.0,
        "accuracy_scored": round(100 * sum(r["correct"] for r in ok) / len(ok), 2) if ok else 0.0,
        "mean_turns": round(mean([r["turns"] for r in ok]), 3),
        "mean_tool_calls": round(mean([r["tool_calls"] for r in ok]), 3),
        "mean_response_tokens": round(mean([r.get("response_tokens", 0) for r in ok]), 1),
        "stops": dict(Counter(r.get("stop") or "?" for r in records)),
        "code_error_rate": round(sum(r["code_errors"] for r in ok) / calls, 4) if calls else 0.0,
        "code_timeout_rate": round(sum(r["code_timeouts"] for r in ok) / calls, 4) if calls else 0.0,
        "error_rate": round(error_rate, 4),
        "errors": {"count": len(errors), "by_kind": dict(Counter(r.get("error_kind") or "error" for r in errors)),
                   "dominant": dominant_error(records), "max_error_rate": cfg.max_error_rate},
        "failed": error_rate > cfg.max_error_rate,
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
    if ks:
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
    b.set_title(f"per-problem solve rate (errors: {summary['errors']['count']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quiet_http_loggers() -> None:
    """No per-request log lines from the HTTP clients (the progress bar is the console)."""
    prefixes = ("httpx", "httpcore", "openai", "aiohttp.access")
    names = set(prefixes) | {"httpx2", "httpcore2"}
    names |= {n for n in logging.root.manager.loggerDict if n.startswith(prefixes)}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


async def evaluate(cfg: EvalConfig, evaluator: Evaluator | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    quiet_http_loggers()
    cfg = cfg.resolved()
    if cfg.data is None:
        raise DataError("no --data given (an RL-schema parquet, e.g. data/rl/aime24.parquet)")
    if cfg.max_tokens < 1 or cfg.max_turns < 1 or cfg.samples < 1:
        raise EvalError("--max-tokens, --max-turns and --samples must be at least 1")
    problems = load_problems(cfg.data)[: cfg.limit]
    out_path = Path(cfg.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = samples_path(cfg.output)
    repair_jsonl(jsonl)
    earlier = load_records(jsonl)
    identity = run_identity(cfg)
    mismatch = check_identity(cfg, identity, bool(earlier))
    latest = latest_records(earlier)
    done = {k: r for k, r in latest.items() if r["status"] == "ok"}
    wanted = {(p["index"], j) for p in problems for j in range(cfg.samples)}
    todo = [(p, j) for p in problems for j in range(cfg.samples) if (p["index"], j) not in done]
    logger.info("%d problems × %d samples: %d finished earlier, %d to run; budget %d response tokens over at "
                "most %d turns per sample", len(problems), cfg.samples, len(done.keys() & wanted), len(todo),
                cfg.max_tokens, cfg.max_turns)
    own_evaluator = evaluator is None
    evaluator = evaluator or Evaluator(cfg)
    quiet_http_loggers()  # again, now that the clients' modules are imported
    records = [r for k, r in done.items() if k in wanted]
    try:
        if cfg.preflight and todo:
            await evaluator.preflight()
        if not mismatch:
            identity_path(cfg.output).write_text(json.dumps(identity, indent=2))
        bar = tqdm(total=len(wanted), initial=len(records), desc="samples", unit="sample", dynamic_ncols=True)
        counts = {"ok": sum(1 for r in records), "correct": sum(r["correct"] for r in records), "error": 0}
        queue: asyncio.Queue = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)

        with jsonl.open("a") as fh:
            async def worker() -> None:
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
                        counts["ok"] += 1
                        counts["correct"] += s.correct
                    else:
                        counts["error"] += 1
                    bar.update(1)
                    bar.set_postfix(pass1=f"{100 * counts['correct'] / max(counts['ok'], 1):.1f}%",
                                    errors=counts["error"], refresh=False)

            # more conversations than LLM slots, so a conversation waiting on the sandbox never idles a slot
            await asyncio.gather(*(worker() for _ in range(min(len(todo), 2 * cfg.concurrency) or 1)))
        bar.close()
    finally:
        if own_evaluator:
            await evaluator.aclose()
    summary = summarize(cfg, problems, list(latest_records(records).values()))
    if mismatch:
        summary["resume_mismatch"] = mismatch
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_path)
    try:
        plot(summary, out_path.with_suffix(".png"))
    except Exception as exc:  # a plot must never hide the numbers
        logger.warning("could not draw %s: %s", out_path.with_suffix(".png"), exc)
    if summary["errors"]["count"]:
        logger.warning("%d of %d samples failed (%s); dominant error: %s", summary["errors"]["count"],
                       summary["num_samples"], summary["errors"]["by_kind"], summary["errors"]["dominant"])
    return summary


def _parse(argv: Sequence[str] | None) -> EvalConfig:
    d = EvalConfig(model="", output="")
    p = argparse.ArgumentParser(prog="python -m recipe.retool.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--output", required=True, help="summary JSON path (samples go to OUTPUT.samples.jsonl)")
    p.add_argument("--data", default=None, help="RL-schema parquet (default: prepare AIME-2024 from the hub)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--no-tools", action="store_true", help="text only: offer no tools, run no tool call")
    p.add_argument("--allow-resume-mismatch", action="store_true",
                   help="resume even when OUTPUT.run.json records another model/data/sampling/budget")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the one-request check of the model server and sandbox")
    p.add_argument("--config", default=d.config,
                   help="GRPO config (name or YAML path) whose validation sampling and budgets are the defaults "
                        "(default %(default)s)")
    p.add_argument("--config-override", dest="config_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of that config, as given to the trainer (repeatable)")
    helps = {"max_tokens": "TOTAL response tokens per sample across all turns, tool outputs included",
             "max_turns": "model turns per sample", "concurrency": "model requests in flight",
             "max_error_rate": "exit 3 when more than this fraction of samples end in error"}
    types = {"max_tokens": int, "max_turns": int, "temperature": float, "top_p": float, "max_tool_output_chars": int}
    for name, value in asdict(d).items():
        if name in ("model", "output", "data", "limit", "no_tools", "allow_resume_mismatch", "preflight", "config",
                    "config_overrides"):
            continue
        flag = "--" + name.replace("_", "-")
        default = f"the GRPO config's {FROM_GRPO_CONFIG[name]}" if name in FROM_GRPO_CONFIG else value
        p.add_argument(flag, type=types.get(name, type(value)), default=value,
                       help=f"{helps.get(name, '')} (default {default})".strip())
    args = vars(p.parse_args(argv))
    return EvalConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_http_loggers()
    cfg = _parse(argv)
    try:
        if cfg.data is None:
            from recipe.retool.data import DEFAULT_SOURCES, prepare_val

            cfg.data = str(Path(cfg.output).parent / "aime24.parquet")
            if not Path(cfg.data).exists():
                prepare_val(DEFAULT_SOURCES["aime24"], cfg.data, data_source="aime24")
        summary = asyncio.run(evaluate(cfg))
    except (DataError, EvalError) as err:
        logger.error("%s", err)
        return 2
    print(json.dumps({k: summary[k] for k in ("pass_at_k", "pass_at_k_coverage", "accuracy", "mean_turns",
                                              "mean_tool_calls", "stops", "error_rate", "tokens")}, indent=2))
    print(f"wrote {cfg.output}, {samples_path(cfg.output)} and {Path(cfg.output).with_suffix('.png')}")
    if summary["failed"]:
        logger.error("%d of %d samples ended in error (%.1f%% > --max-error-rate %.1f%%); dominant error: %s",
                     summary["errors"]["count"], summary["num_samples"], 100 * summary["error_rate"],
                     100 * cfg.max_error_rate, summary["errors"]["dominant"])
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
