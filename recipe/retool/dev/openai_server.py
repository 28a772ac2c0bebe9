"""A small OpenAI-compatible chat server over the ``hf_dev`` engine, for evaluating the miniature.

    python -m recipe.retool.dev.openai_server MODEL_DIR [--host 127.0.0.1] [--port 8000] [--device cpu] [--dtype float32]

Production evaluation talks to vLLM or SGLang. On a machine without them, the miniature's
checkpoints still have to be served over real HTTP so that ``evaluate_model.sh`` runs unchanged:
this process does that with the same batched generator the GRPO rollouts use
(:class:`recipe.retool.dev.hf_rollout.HFDevServer`), so concurrent requests decode together.
(``transformers serve`` works too, and ``--server transformers`` in the pipeline uses it; on two
CPU cores it is several times slower on this model size.)

Endpoints: ``POST /v1/chat/completions`` (non-streaming; ``messages``, ``tools``, ``temperature``,
``top_p``, ``max_tokens``/``max_completion_tokens``, ``seed`` ignored), ``GET /v1/models``,
``GET /health``. The prompt is the model's own chat template applied to ``messages`` and
``tools``; the reply is the decoded text, tool calls left in it as hermes ``<tool_call>`` text
(the evaluation harness parses them, as it does for servers without a tool parser). A prompt
longer than the context answers HTTP 400 with the reason, as vLLM does.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _clean(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's tool_calls carry ``arguments`` as a JSON string; templates want the object."""
    import json

    calls = []
    for call in message.get("tool_calls") or []:
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**call, "function": fn})
    return {**message, "tool_calls": calls} if calls else message


def create_app(model_path: str, *, device: str = "cpu", max_model_len: int = 4096, max_batch: int = 64,
               seed: int = 0, dtype: str = "float32"):
    from fastapi import FastAPI, HTTPException
    from transformers import AutoTokenizer

    from recipe.retool.dev.hf_rollout import HFDevServer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = HFDevServer(model_path, prompt_length=max_model_len, response_length=max_model_len,
                         max_model_len=max_model_len, max_batch=max_batch, device=device, dtype=dtype, seed=seed)
    app = FastAPI(title="hf_dev OpenAI-compatible server")
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_path, "stats": engine.get_stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_path, "object": "model", "created": created,
                                            "owned_by": "hf_dev"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> dict[str, Any]:
        ids = tokenizer.apply_chat_template([_clean(m) for m in req.messages], tools=req.tools,
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        room = max_model_len - len(ids) - 1
        if room <= 0:
            raise HTTPException(400, f"This model's maximum context length is {max_model_len} tokens; "
                                     f"the messages take {len(ids)}.")
        wanted = req.max_completion_tokens or req.max_tokens or room
        params = {"temperature": req.temperature, "top_p": req.top_p, "max_tokens": min(wanted, room)}
        out = await engine.generate(ids, params, request_id=uuid.uuid4().hex)
        tokens = list(out.token_ids)
        finished = bool(tokens) and tokens[-1] in engine.engine.eos_ids
        text = tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=False)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": req.model or model_path,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if finished else "length"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                      "total_tokens": len(ids) + len(tokens)},
        }

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m recipe.retool.dev.openai_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a Hugging Face model directory (config, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype (on a CPU, bf16 only where native: recipe.retool.perf.precision)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    app = create_app(a.model, device=a.device, max_model_len=a.max_model_len, seed=a.seed, dtype=a.dtype)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
