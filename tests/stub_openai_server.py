"""A scripted OpenAI-compatible chat server, for tests and the evaluation benchmark only.

For each conversation it first calls ``code_interpreter`` with ``print(<answer>)`` (as native
``tool_calls`` or as hermes ``<tool_call>`` text), then answers ``\\boxed{<tool output>}`` — or,
to get an exact number of correct samples per problem, that number plus one once the problem's
quota of correct answers is used up. It can also fail with HTTP 500, and it measures how many
requests are in flight over time.
"""

from __future__ import annotations

import asyncio
import json
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
    requests: int = 0
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


def completion(model: str, content: str | None, tool_calls=None) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls" if tool_calls else "stop",
                     "message": {"role": "assistant", "content": content, "tool_calls": tool_calls}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
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
            problem = next(m["content"] for m in messages if m["role"] == "user")
            key = script.key(problem)
            if script.requests <= script.fail_first or (script.fail_always and script.fail_always in problem):
                return JSONResponse({"error": {"message": "scripted failure"}}, status_code=500)
            if key is None:
                return JSONResponse(completion(body["model"], "I do not know. \\boxed{0}"))
            answer, quota = script.answers[key]
            last = messages[-1]
            if last["role"] == "user":
                code = f"print({answer})"
                if script.mode == "native":
                    call = {"id": f"call_{uuid.uuid4().hex[:6]}", "type": "function",
                            "function": {"name": "code_interpreter", "arguments": json.dumps({"code": code})}}
                    return JSONResponse(completion(body["model"], "Let me compute.", [call]))
                text = "Let me compute.\n<tool_call>\n" + json.dumps(
                    {"name": "code_interpreter", "arguments": {"code": code}}) + "\n</tool_call>"
                return JSONResponse(completion(body["model"], text))
            value = int(str(last["content"]).strip())
            n = script.answered[key]
            script.answered[key] += 1
            return JSONResponse(completion(body["model"], f"So the answer is \\boxed{{{value if n < quota else value + 1}}}."))
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
