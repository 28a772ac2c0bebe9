"""The consistency metrics (recipe/retool/consistency.py): each passes on the real path and flags an
injected fault — log-probs perturbed or misaligned, a separator dropped at the tool boundary, a tool
output tokenized on its own, a template that renders differently once the conversation goes on, a
malformed tool call, a trajectory cut by a limit. The recipe's agent loop is run as verl's agent-loop
worker builds it (from config/agent_loop/retool.yaml), with a scripted LLM server; the GRPO loop
test (tests/dev/test_mini_grpo.py) checks the metrics in a real run's metrics file."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from recipe.retool import PACKAGE_DIR, consistency
from recipe.retool.consistency import CUT_LENGTH, CUT_TURNS, RECORD_KEY, logprob_gap, token_drift, turn_calls
from recipe.retool.train import compose, path_overrides

TOOLS = [{"type": "function", "function": {
    "name": "code_interpreter", "description": "Run Python code.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
SCHEMAS = consistency.tool_schemas(TOOLS)
CALL = "Let me compute.\n<tool_call>\n" + json.dumps(
    {"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}) + "\n</tool_call>"
ANSWER = "The answer is \\boxed{42}."
END = "<|im_end|>"


def healthy_logprobs(m: dict) -> bool:
    """What the GRPO loop test asserts of hf_dev in fp32 on the CPU (docs/miniature.md)."""
    return m["consistency/logprob_diff/max"] < 1e-3 and m["consistency/logprob_diff/share_above_tol"] == 0.0


# ----------------------------------------------------------------------------- log-probabilities


def test_hf_dev_log_probs_match_the_trainers_and_a_perturbation_is_flagged(tiny_model_dir):
    from recipe.retool.dev.hf_rollout import DevGenerator, Sampling

    engine = DevGenerator(str(tiny_model_dir))
    prompts = [[5, 9, 14, 3], [7, 7, 2, 11, 40, 41], [12]]  # batched and left-padded, as the server decodes
    outs = engine.generate(prompts, [12] * 3, Sampling(temperature=1.0, logprobs=True), torch.Generator().manual_seed(0))
    width = max(len(o.token_ids) for o in outs)
    rollout, actor, mask = (torch.zeros(len(outs), width) for _ in range(3))
    with torch.no_grad():  # the trainer's side: one unpadded forward per sequence, as the actor scores it
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            logits = engine.model(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1:-1].float()
            actor[i, :len(o.token_ids)] = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
            rollout[i, :len(o.token_ids)] = torch.tensor(o.log_probs)
            mask[i, :len(o.token_ids)] = 1
    real = logprob_gap(rollout, actor, mask, tol=0.1)
    assert healthy_logprobs(real), real

    perturbed = rollout.clone()
    perturbed[0, 1] += 0.3  # one token off by 0.3 nats
    m = logprob_gap(perturbed, actor, mask, tol=0.1)
    assert not healthy_logprobs(m)
    assert m["consistency/logprob_diff/max"] == pytest.approx(0.3, abs=1e-3)
    assert m["consistency/logprob_diff/share_above_tol"] == pytest.approx(1 / mask.sum().item())
    shifted = torch.roll(rollout, 1, dims=1) * mask  # log-probs one token late against their tokens
    assert not healthy_logprobs(logprob_gap(shifted, actor, mask, tol=0.1))


def test_only_generated_tokens_count():
    rollout = torch.tensor([[-1.0, 0.0, -2.0], [-0.5, -0.5, 0.0]])
    actor = torch.tensor([[-1.0, -9.0, -2.05], [-0.5, -0.7, -4.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])  # tool tokens and padding are 0
    m = logprob_gap(rollout, actor, mask, tol=0.1)
    assert m["consistency/logprob_diff/max"] == pytest.approx(0.2)
    assert m["consistency/logprob_diff/mean"] == pytest.approx(0.25 / 4)
    assert m["consistency/logprob_diff/share_above_tol"] == pytest.approx(0.25)
    assert logprob_gap(rollout, actor, torch.zeros_like(mask), tol=0.1) == {}


# ----------------------------------------------------------------------------- token drift (ids built by hand)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def conversation(tok, tool_context: list[int] | None = None, first_turn: str = CALL):
    """A correct rollout of one tool round (as verl builds it), its messages and mask."""
    prompt = [{"role": "user", "content": "What is 6 * 7?"}]
    prompt_ids = encode(tok, tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=False))
    first, last = encode(tok, first_turn + END), encode(tok, ANSWER + END)
    context = tool_context if tool_context is not None else encode(
        tok, "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    messages = [*prompt, {"role": "assistant", "content": "Let me compute.\n", "tool_calls": [
        {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}}]},
                {"role": "tool", "content": "42"}, {"role": "assistant", "content": ANSWER}]
    return messages, prompt_ids, first + context + last, [1] * len(first) + [0] * len(context) + [1] * len(last)


def test_a_correct_rollout_has_no_drift_and_a_dropped_separator_is_found(dev_tokenizer):
    messages, prompt_ids, response, mask = conversation(dev_tokenizer)
    assert token_drift(dev_tokenizer, messages, 1, prompt_ids, response, mask, tools=TOOLS) is None
    # the rollout may stop short of the render (a cut turn), never go past it
    assert token_drift(dev_tokenizer, messages, 1, prompt_ids, response[:-3], mask[:-3], tools=TOOLS) is None

    # verl before 0.9.0: the separator after the assistant's end-of-turn lost at each tool boundary
    dropped = encode(dev_tokenizer, "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    messages, prompt_ids, response, mask = conversation(dev_tokenizer, dropped)
    drift = token_drift(dev_tokenizer, messages, 1, prompt_ids, response, mask, tools=TOOLS)
    boundary = len(prompt_ids) + len(encode(dev_tokenizer, CALL + END))
    assert drift is not None and (drift.position, drift.where) == (boundary, "context")
    assert drift.rollout.endswith("⟦<|im_start|>user\n<tool_response>\n42\n</to")
    assert "<|im_end|>⟦\n<|im_start|>user" in drift.template


def test_a_tool_output_tokenized_on_its_own_is_found(dev_tokenizer):
    word = next(w for w in ("answer", "print", "compute", "the") if len(encode(dev_tokenizer, w)) < len(w))
    split = [i for ch in word for i in encode(dev_tokenizer, ch)]  # same text, other ids
    head = encode(dev_tokenizer, "\n<|im_start|>user\n<tool_response>\n")
    context = head + split + encode(dev_tokenizer, "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    messages, prompt_ids, response, mask = conversation(dev_tokenizer, context)
    messages[2]["content"] = word
    drift = token_drift(dev_tokenizer, messages, 1, prompt_ids, response, mask, tools=TOOLS)
    assert drift is not None and drift.retokenized and drift.where == "context"
    assert drift.position == len(prompt_ids) + len(encode(dev_tokenizer, CALL + END)) + len(head)


def test_a_template_that_changes_the_models_text_is_drift(dev_tokenizer):
    tok = copy.deepcopy(dev_tokenizer)  # a template that trims the assistant's text (as some drop its reasoning)
    tok.chat_template = tok.chat_template.replace("{{ message['content'] or '' }}", "{{ (message['content'] or '') | trim }}")
    messages, prompt_ids, response, mask = conversation(tok, first_turn=CALL + "\n")
    drift = token_drift(tok, messages, 1, prompt_ids, response, mask, tools=TOOLS)
    assert drift is not None and drift.where == "generated"
    assert drift.position == len(prompt_ids) + len(encode(tok, CALL))  # the newline the template drops
    assert token_drift(dev_tokenizer, messages, 1, prompt_ids, response, mask, tools=TOOLS) is None


# ----------------------------------------------------------------------------- tool-call health (text)


def test_turn_calls_name_what_is_wrong():
    call = lambda obj: "<tool_call>\n" + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n</tool_call>"  # noqa: E731
    assert turn_calls(CALL, SCHEMAS) == (1, [])
    assert turn_calls("no call, just an answer \\boxed{1}", SCHEMAS) == (0, [])
    assert turn_calls(call('{"name": "code_interpreter", "arguments": {"code": "1"'), SCHEMAS) == (1, ["not JSON"])
    assert turn_calls(call({"name": "python", "arguments": {"code": "1"}}), SCHEMAS)[1] == ["unknown tool 'python'"]
    assert turn_calls(call({"name": "code_interpreter", "arguments": {}}), SCHEMAS)[1] == ["missing argument 'code'"]
    assert turn_calls(call({"name": "code_interpreter", "arguments": {"code": 7}}), SCHEMAS)[1] == [
        "argument 'code' is not of its declared type"]
    assert turn_calls(call({"name": "code_interpreter", "arguments": "{\"code\": \"1\"}"}), SCHEMAS)[1] == [
        "arguments are not an object"]
    opened = "<tool_call>\n{\"name\": \"code_interpreter\""
    assert turn_calls(opened, SCHEMAS, finished=True) == (1, ["never closed"])
    assert turn_calls(opened, SCHEMAS, finished=False) == (1, [])  # the length limit's cut, not the model's fault


def test_tool_health_and_drift_aggregate_a_steps_records():
    records = [{"assistant_turns": 2, "invalid_turns": 0, "tool_calls": 1, "cut": "", "drift_checked": True, "drift": None},
               {"assistant_turns": 3, "invalid_turns": 1, "tool_calls": 2, "cut": CUT_TURNS, "drift_checked": False},
               {"assistant_turns": 1, "invalid_turns": 0, "tool_calls": 0, "cut": CUT_LENGTH, "drift_checked": True,
                "drift": {"position": 17, "where": "context"}, "noncanonical": True}]
    assert consistency.tool_health(records) == {
        "consistency/tool_calls/invalid_turn_share": pytest.approx(1 / 6), "consistency/tool_calls/per_trajectory": 1.0,
        "consistency/cut/turn_limit_share": pytest.approx(1 / 3), "consistency/cut/length_limit_share": pytest.approx(1 / 3)}
    metrics, first = consistency.drift_metrics(records)
    assert metrics == {"consistency/token_drift/checked": 2.0, "consistency/token_drift/mismatched": 1.0,
                       "consistency/token_drift/noncanonical": 1.0, "consistency/token_drift/first_position": 17.0}
    assert first == {"position": 17, "where": "context"}
    assert consistency.drift_metrics(records[1:2]) == ({}, None)  # none checked: no drift metrics at all
    fields = [{RECORD_KEY: records[0]}, {"reward_extra_info": {}}, None]  # another agent loop's rows have none
    assert consistency.records_of(fields) == [records[0]]


def test_drift_sample_is_a_share_of_the_steps_trajectories():
    assert consistency.drift_rate(64, 256, 16) == pytest.approx(64 / 4096)
    assert consistency.drift_rate(64, 16, 4) == 1.0 and consistency.drift_rate(0, 16, 4) == 0.0
    with pytest.raises(ValueError, match="drift_sample"):
        consistency.drift_rate(-1, 16, 4)


# ----------------------------------------------------------------------------- the recipe's agent loop, end to end


class ScriptedServer:
    """Stands in for the rollout engine: answers from a script (a reply: text, or token ids)."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies = tokenizer, list(replies)

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        reply = self.replies.pop(0)
        ids = reply if isinstance(reply, list) else self.tokenizer.encode(reply, add_special_tokens=False)
        return TokenOutput(token_ids=ids, stop_reason="completed")


@pytest.fixture
def grpo_cfg(tiny_model_dir, sample_data):
    def make(*extra):
        return compose("retool_grpo_template", [
            *path_overrides(str(tiny_model_dir), str(sample_data["rl"].parent.parent), "/tmp/out", "c"),
            f"retool.recipe_dir={PACKAGE_DIR}", "actor_rollout_ref.rollout.prompt_length=1024",
            "actor_rollout_ref.rollout.response_length=512", "actor_rollout_ref.rollout.n=1",
            "data.train_batch_size=1", "retool.consistency.drift_sample=1", *extra])
    return make


async def run_loop(cfg, tokenizer, replies, monkeypatch):
    """The agent loop verl's worker instantiates for ``tool_agent`` under our config, on one prompt."""
    import hydra
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.tools.tool_registry import initialize_tools_from_config
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setenv("RETOOL_SANDBOX_URL", "http://127.0.0.1:9")  # no sandbox: the tool answers with an error
    [entry] = [e for e in OmegaConf.load(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
               if e.name == "tool_agent"]
    tools = initialize_tools_from_config(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    for tool in tools:
        tool.client.max_retries, tool.client.retry_backoff = 1, 0.01
    loop = hydra.utils.instantiate(entry, trainer_config=DictConfigWrap(cfg), server_manager=ScriptedServer(tokenizer, replies),
                                   tokenizer=tokenizer, processor=None, hf_model_type="qwen2", dataset_cls=RLHFDataset,
                                   data_config=DictConfigWrap(cfg.data), tools=ToolListWrap(tools))
    out = await loop.run(sampling_params={"temperature": 1.0}, raw_prompt=[{"role": "user", "content": "What is 6 * 7?"}],
                         tools_kwargs={})
    return out, out.extra_fields[RECORD_KEY]


async def test_the_agent_loop_records_a_healthy_trajectory(grpo_cfg, dev_tokenizer, monkeypatch):
    out, record = await run_loop(grpo_cfg(), dev_tokenizer, [CALL + END, ANSWER + END], monkeypatch)
    assert type(out).__name__ == "AgentLoopOutput" and 0 in out.response_mask  # a tool round happened
    assert record["drift_checked"] and record["drift"] is None, record["drift"]
    assert (record["assistant_turns"], record["invalid_turns"], record["tool_calls"], record["cut"]) == (2, 0, 1, "")


async def test_the_agent_loop_finds_a_template_that_drifts_at_the_tool_boundary(grpo_cfg, dev_tokenizer, monkeypatch):
    """A template whose tool turn ends with a newline only when it is the last message: verl builds the
    tool turn on its own (last), the render of the whole conversation has the assistant after it."""
    tok = copy.deepcopy(dev_tokenizer)
    turn_end = "</tool_response><|im_end|>\n"
    assert turn_end in tok.chat_template
    tok.chat_template = tok.chat_template.replace(turn_end, "</tool_response><|im_end|>{{ '\\n' if loop.last else '' }}")
    out, record = await run_loop(grpo_cfg(), tok, [CALL + END, ANSWER + END], monkeypatch)
    drift = record["drift"]
    assert record["drift_checked"] and drift is not None and drift["where"] == "context"
    assert "</tool_response><|im_end|>⟦\n<|im_start|>assistant" in drift["rollout"]
    assert "</tool_response><|im_end|>⟦<|im_start|>assistant" in drift["template"]


async def test_the_agent_loop_counts_a_malformed_call(grpo_cfg, dev_tokenizer, monkeypatch):
    bad = "Let me compute.\n<tool_call>\n{\"name\": \"code_interpreter\", \"arguments\": {\"code\": \"1\"\n</tool_call>"
    _, record = await run_loop(grpo_cfg(), dev_tokenizer, [bad + END], monkeypatch)
    assert (record["assistant_turns"], record["invalid_turns"], record["tool_calls"], record["cut"]) == (1, 1, 0, "")
    assert record["problems"] == ["not JSON"]


async def test_the_agent_loop_tells_the_turn_limit_from_the_length_limit(grpo_cfg, dev_tokenizer, monkeypatch):
    cfg = grpo_cfg("actor_rollout_ref.rollout.multi_turn.max_assistant_turns=1")
    _, record = await run_loop(cfg, dev_tokenizer, [CALL + END], monkeypatch)
    assert (record["tool_calls"], record["cut"], record["invalid_turns"]) == (0, CUT_TURNS, 0)

    _, record = await run_loop(grpo_cfg(), dev_tokenizer, [CALL + END, ANSWER + END], monkeypatch)
    assert record["cut"] == ""  # the same calls with turns to spare
    cfg = grpo_cfg("actor_rollout_ref.rollout.response_length=16")
    opened = encode(dev_tokenizer, CALL)[:20]  # the engine stopped at its token budget, mid-call
    _, record = await run_loop(cfg, dev_tokenizer, [opened], monkeypatch)
    assert (record["cut"], record["invalid_turns"]) == (CUT_LENGTH, 0)
    assert record["drift_checked"] and record["drift"] is None  # a cut turn is a prefix of the render


# ----------------------------------------------------------------------------- the report card


def test_a_runs_consistency_summary_and_report_card_rows(tmp_path):
    from recipe.retool.consistency import consistency_rows

    c = "consistency/"
    steps = {1: {"critic/score/mean": 0.1, c + "logprob_diff/mean": 1e-6, c + "logprob_diff/max": 4e-5,
                 c + "logprob_diff/share_above_tol": 0.0, c + "token_drift/checked": 64.0, c + "token_drift/mismatched": 0.0,
                 c + "tool_calls/per_trajectory": 0.5, c + "tool_calls/invalid_turn_share": 0.1,
                 c + "cut/turn_limit_share": 0.0, c + "cut/length_limit_share": 0.25},
             2: {"critic/score/mean": 0.2, c + "logprob_diff/mean": 3e-6, c + "logprob_diff/max": 2e-5,
                 c + "logprob_diff/share_above_tol": 0.0, c + "token_drift/checked": 64.0, c + "token_drift/mismatched": 1.0,
                 c + "tool_calls/per_trajectory": 1.5, c + "tool_calls/invalid_turn_share": 0.0,
                 c + "cut/turn_limit_share": 0.5, c + "cut/length_limit_share": 0.25},
             3: {"val-core/x/acc/mean@4": 0.5}}  # a validation-only record
    summary = consistency.run_summary(steps)
    assert summary["steps"] == 2 and summary["logprob_diff/max"] == 4e-5
    assert summary["logprob_diff/mean"] == pytest.approx(2e-6) and summary["token_drift/checked"] == 128.0
    assert summary["token_drift/mismatched"] == 1.0 and summary["tool_calls/per_trajectory"] == 1.0
    assert consistency.run_summary({1: {"critic/score/mean": 0.0}}) == {}

    assert consistency.first_drift(tmp_path) is None
    drift = {"step": 2, "position": 300, "where": "context", "rollout": "a⟦b", "template": "a⟦\nb", "retokenized": False}
    (tmp_path / consistency.DRIFT_FILE).write_text(json.dumps(drift) + "\n" + json.dumps({**drift, "step": 5}) + "\n")
    assert consistency.first_drift(tmp_path) == drift

    rows = consistency_rows("grpo", {"summary": summary, "first_drift": drift})
    assert len(rows) == 3 and "max 4.00e-05" in rows[0] and "above the tolerance 0.00%" in rows[0]
    assert "1 of 128 checked trajectories; first at step 2, token 300 (context)" in rows[1]
    assert "tool calls per trajectory 1.00" in rows[2] and "turn limit 25.0%" in rows[2]
    assert "not measured" in consistency_rows("grpo", {})[0]


def test_turns_of_another_tool_call_format_are_left_out_of_the_invalid_share():
    from recipe.retool.consistency import Record, tool_health

    hermes = Record(assistant_turns=4, invalid_turns=1, tool_calls=3).as_dict()
    other = Record(assistant_turns=4, invalid_turns=0, tool_calls=2, calls_read=False).as_dict()
    mixed = tool_health([hermes, other])
    assert mixed["consistency/tool_calls/invalid_turn_share"] == 0.25  # of the read turns only
    assert mixed["consistency/tool_calls/per_trajectory"] == 2.5
    assert "consistency/tool_calls/invalid_turn_share" not in tool_health([other])  # not 0: not measured
