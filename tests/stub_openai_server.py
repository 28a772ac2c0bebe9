"""A scripted OpenAI-compatible chat server, for tests and the evaluation benchmark only.

For each conversation it first calls ``code_interpreter`` with ``print(<answer>)`` (as native
``tool_calls`` or as hermes ``<tool_call>`` text), then answers ``\\boxed{<tool output>}`` — or,
to get an exact number of correct samples per problem, that number plus one once the problem's
quota of correct answers is used up. It can also fail with HTTP 500, and it measures how many
requests are in flight over time.

Like a real server it counts tokens (one per character: ``usage.prompt_tokens`` is the rendered
history, ``completion_tokens`` the reply), honours ``max_tokens`` (the reply is cut, finish reason
``length``), can reject a history longer than ``context_limit`` with vLLM's HTTP 400, and checks
the history it receives: each tool call must appear exactly once (``history_violations``). When no
``tools`` are offered it answers in text straight away (a text-only model).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class Script:
    answers: dict[str, tuple[str, int]]  # problem text substring → (answer, how many samples answer correctly)
    mode: str = "native"  # native | hermes
    fail_first: int = 0  # the first N requests get HTTP 500
    fail_always: str | None = None  # problems containing this text always get HTTP 500
    delay: float = 0.0
    context_limit: int | None = None  # HTTP 400 "maximum context length" when the history is longer
    tool_call_without_tools: bool = False  # write a hermes <tool_call> even when no tools are offered
    requests: int = 0
    max_tokens_seen: list = field(default_factory=list)
    tools_seen: list = field(default_factory=list)
    history_violations: list = field(default_factory=list)
    answered: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight: int = 0
    busy_integral: float = 0.0  # ∫ in_flight dt
    first_at: float | None = None
    last_at: float | None = None
    _t: float = 0.0

    def _tick(self, delta: int) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at, self._t = now, now
        self.busy_integral += self.in_flight * (now - self._t)
        self._t = now
        self.in_flight += delta
        self.last_at = now

    def key(self, text: str) -> str | None:
        return next((k for k in self.answers if k in text), None)


def history_tokens(messages: list[dict]) -> int:
    """One token per character of every content and tool-call argument string."""
    n = 0
    for m in messages:
        n += len(m.get("content") or "")
        for c in m.get("tool_calls") or []:
            n += len(c["function"]["arguments"])
    return n


def check_history(messages: list[dict]) -> list[str]:
    """Each tool call must be in the history exactly once, followed by its tool output."""
    problems, calls, outputs = [], 0, 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            in_text = len(re.findall(r"<tool_call>", m.get("content") or ""))
            structured = len(m.get("tool_calls") or [])
            if in_text and structured:
                problems.append(f"messages[{i}]: the call is both in content and in tool_calls")
            calls += in_text + structured
        elif m["role"] == "tool":
            outputs += 1
    if calls != outputs:
        problems.append(f"{calls} tool calls in the history for {outputs} tool outputs")
    return problems


def completion(model: str, content: str | None, tool_calls=None, prompt_tokens: int = 10,
               max_tokens: int | None = None) -> dict:
    finish = "tool_calls" if tool_calls else "stop"
    if content is not None and max_tokens is not None and len(content) > max_tokens:
        content, tool_calls, finish = content[:max_tokens], None, "length"
    completion_tokens = len(content or "") + sum(len(c["function"]["arguments"]) for c in tool_calls or [])
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content, "tool_calls": tool_calls}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        script.requests += 1
        script._tick(+1)
        try:
            if script.delay:
                await asyncio.sleep(script.delay)
            messages = body["messages"]
            model, max_tokens, tools = body["model"], body.get("max_tokens"), body.get("tools")
            script.max_tokens_seen.append(max_tokens)
            script.tools_seen.append(bool(tools))
            prompt_tokens = history_tokens(messages)

            def reply(content, tool_calls=None):
                return JSONResponse(completion(model, content, tool_calls, prompt_tokens, max_tokens))

            problem = next(m["content"] for m in messages if m["role"] == "user")
            key = script.key(problem)
            if script.requests <= script.fail_first or (script.fail_always and script.fail_always in problem):
                return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
            violations = check_history(messages)
            if violations:
                script.history_violations.extend(violations)
                return JSONResponse({"error": {"message": "; ".join(violations)}}, status_code=400)
            if script.context_limit is not None and prompt_tokens > script.context_limit:
                return JSONResponse({"object": "error", "type": "BadRequestError", "code": 400, "message": (
                    f"This model's maximum context length is {script.context_limit} tokens. However, you "
                    f"requested {prompt_tokens + (max_tokens or 0)} tokens in the messages.")}, status_code=400)
            if key is None:
                return reply("I do not know. \\boxed{0}")
            answer, quota = script.answers[key]
            last = messages[-1]
            if last["role"] == "user" and not tools and not script.tool_call_without_tools:
                n = script.answered[key]
                script.answered[key] += 1
                return reply(f"The answer is \\boxed{{{answer if n < quota else int(answer) + 1}}}.")
            if last["role"] == "user":
                code = f"print({answer})"
                if script.mode == "native" and tools:
                    call = {"id": f"call_{uuid.uuid4().hex[:6]}", "type": "function",
                            "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})}}
                    return reply("Let me compute.", [call])
                text = "Let me compute.\n<tool_call>\n" + json.dumps(
                    {"name": "code_interpreter", "arguments": {"code": code}}) + "\n</tool_call>"
                return reply(text)
            value = int(str(last["content"]).strip())
            n = script.answered[key]
            script.answered[key] += 1
            return reply(f"So the answer is \\boxed{{{value if n < quota else value + 1}}}.")
        finally:
            script._tick(-1)

    @app.get("/stats")
    async def stats():
        script._tick(0)
        return {"requests": script.requests, "busy_integral": script.busy_integral,
                "span": (script.last_at or 0) - (script.first_at or 0)}

    return app


class StubServer:
    def __init__(self, script: Script, port: int):
        self.script = script
        self.url = f"http://127.0.0.1:{port}/v1"
        config = uvicorn.Config(make_app(script), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


if __name__ == "__main__":  # run in its own process: python stub_openai_server.py PORT SCRIPT_JSON
    import sys

    spec = json.loads(sys.argv[2])
    spec["answers"] = {k: tuple(v) for k, v in spec["answers"].items()}
    uvicorn.run(make_app(Script(**spec)), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
