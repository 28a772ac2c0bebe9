"""verl's real ToolAgentLoop, end to end on CPU: a scripted LLM emits a hermes <tool_call>, our tool runs
the code on our real sandbox server, the output lands in the conversation, our reward scores the answer."""

from __future__ import annotations

import json

import pytest

from recipe.retool import PACKAGE_DIR
from recipe.retool.reward import compute_score
from recipe.retool.train import compose, path_overrides

CODE = "```python\nimport sympy\nn = sympy.factorial(5) + 2\nn\n```"  # bare last expression: the tool prints it


class ScriptedServer:
    """Stands in for the SGLang server: answers from a script, and records what it was shown."""

    def __init__(self, tokenizer, replies):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[str] = []

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        self.prompts.append(self.tokenizer.decode(prompt_ids))
        text = self.replies.pop(0)
        return TokenOutput(token_ids=self.tokenizer.encode(text, add_special_tokens=False), stop_reason="completed")


def make_loop(cfg, tokenizer, server):
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.tools.tool_registry import initialize_tools_from_config
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tools = initialize_tools_from_config(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    return ToolAgentLoop(trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tokenizer,
                         processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data),
                         tools=ToolListWrap(tools))


@pytest.fixture
def cfg(tiny_model_dir, sample_data):
    data_dir = sample_data["rl"].parent.parent
    return compose("retool_grpo_template", [
        *path_overrides(str(tiny_model_dir), str(data_dir), "/tmp/out", "loop"), f"retool.recipe_dir={PACKAGE_DIR}",
        "actor_rollout_ref.rollout.prompt_length=1024", "actor_rollout_ref.rollout.response_length=1024"])


def tool_call(code: str) -> str:
    return "Let me compute it.\n<tool_call>\n" + json.dumps(
        {"name": "code_interpreter", "arguments": {"code": code}}) + "\n</tool_call><|im_end|>"


async def test_tool_agent_loop_runs_code_on_our_sandbox_and_scores(cfg, dev_tokenizer, sandbox_server, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("RETOOL_SANDBOX_URL", sandbox_server.url)
    server = ScriptedServer(dev_tokenizer, [tool_call(CODE), "So the answer is \\boxed{122}.<|im_end|>"])
    loop = make_loop(cfg, dev_tokenizer, server)
    row = pd.read_parquet(cfg.data.val_files).iloc[0]
    out = await loop.run(sampling_params={"temperature": 1.0}, raw_prompt=list(row["prompt"]),
                         tools_kwargs=row["extra_info"]["tools_kwargs"])

    # the second generation saw the interpreter's real output inside a tool response
    assert len(server.prompts) == 2
    assert "<tool_response>\n122\n</tool_response>" in server.prompts[1]
    assert "code_interpreter" in server.prompts[0]  # tool schema rendered by the chat template
    response = dev_tokenizer.decode(out.response_ids)
    assert "<tool_response>" in response and response.rstrip().endswith("\\boxed{122}.<|im_end|>")
    # tool tokens are masked out of the loss, model tokens are not
    mask = out.response_mask
    tool_start = dev_tokenizer.decode(out.response_ids).index("<tool_response>")
    assert 0 in mask and 1 in mask and mask[0] == 1 and tool_start > 0
    assert out.num_turns >= 3  # user, assistant (tool call), tool, assistant
    meta = {**out.extra_fields, "num_turns": out.num_turns}  # what verl's reward manager adds to extra_info
    reward = compute_score(data_source="aime24", solution_str=response, ground_truth="122", extra_info=meta)
    assert reward["score"] == 1.0 and reward["num_tool_calls"] == 1
    wrong = compute_score(data_source="aime24", solution_str=response, ground_truth="123", extra_info=meta)
    assert wrong["score"] == pytest.approx(-0.9) and wrong["acc"] == 0.0


async def test_sandbox_down_does_not_crash_the_rollout(cfg, dev_tokenizer, monkeypatch):
    monkeypatch.setenv("RETOOL_SANDBOX_URL", "http://127.0.0.1:9")  # nothing listens there
    server = ScriptedServer(dev_tokenizer, [tool_call("print(1)"), "I could not run code. \\boxed{0}<|im_end|>"])
    loop = make_loop(cfg, dev_tokenizer, server)
    for tool in loop.tools.values():  # keep the test quick: one retry, short backoff
        tool.client.max_retries, tool.client.retry_backoff = 1, 0.01
    out = await loop.run(sampling_params={}, raw_prompt=[{"role": "user", "content": "What is 0?"}], tools_kwargs={})
    assert "Sandbox error" in server.prompts[1]
    assert dev_tokenizer.decode(out.response_ids).rstrip().endswith("\\boxed{0}<|im_end|>")
