"""recipe.retool.evaluate: pass@k maths, tool formats and the history they leave,
budgets, per-cause outcomes, resume identity, preflight, exit codes, and one scoring rule with the
RL reward (against a scripted OpenAI-compatible server and our real sandbox)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from math import comb

import pytest
from stub_openai_server import Script, StubServer

from recipe.retool import PACKAGE_DIR
from recipe.retool.data import load_code_tool_schema, rl_row, write_parquet
from recipe.retool.evaluate import (
    TOOL_MESSAGE_OVERHEAD,
    EvalConfig,
    EvalError,
    _parse,
    evaluate,
    identity_path,
    pass_at_k,
    samples_path,
)
from recipe.retool.processes import free_port
from recipe.retool.reward import compute_score

REPO = PACKAGE_DIR.parents[1]


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(32, 3, 8) == pytest.approx(1 - comb(29, 8) / comb(32, 8))
    assert pass_at_k(5, 3, 3) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


@pytest.fixture
def problems_parquet(tmp_path):
    rows = [rl_row(f"Problem alpha {i}: compute.", str(100 + i), "aime24", i, "test", "code_interpreter")
            for i in range(3)]
    path = tmp_path / "aime.parquet"
    write_parquet(rows, path)
    return path


@pytest.fixture
def llm_factory():
    servers = []

    def make(script: Script) -> StubServer:
        servers.append(StubServer(script, free_port()))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def config(tmp_path, llm, sandbox, data, **kw) -> EvalConfig:
    kw = {"samples": 4, "concurrency": 8, "max_retries": 3, **kw}
    return EvalConfig(model="stub", output=str(tmp_path / "out" / "aime.json"), base_url=llm.url,
                      sandbox_url=sandbox.url, data=str(data), **kw)


def alpha(quotas: dict[int, int]) -> dict[str, tuple[str, int]]:
    return {f"alpha {i}": (str(100 + i), q) for i, q in quotas.items()}


def records(cfg: EvalConfig) -> list[dict]:
    return [json.loads(line) for line in samples_path(cfg.output).read_text().splitlines()]


@pytest.mark.parametrize("mode", ["native", "hermes"])
def test_end_to_end_pass_at_k_and_outputs(tmp_path, sandbox_server, problems_parquet, llm_factory, mode):
    llm = llm_factory(Script(alpha({0: 0, 1: 1, 2: 4}), mode=mode))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet)
    summary = asyncio.run(evaluate(cfg))
    # hand-computed: problem pass@1 = 0, 1/4, 1 → 41.67%; pass@2 = 0, 1/2, 1 → 50%; pass@4 = 0, 1, 1 → 66.67%
    assert summary["pass_at_k"] == {"pass@1": 41.67, "pass@2": 50.0, "pass@4": 66.67}
    assert summary["pass_at_k_coverage"]["pass@4"] == {"problems": 3, "of": 3}
    assert summary["accuracy"] == round(100 * 5 / 12, 2)
    assert summary["mean_turns"] == 2 and summary["mean_tool_calls"] == 1 and summary["code_error_rate"] == 0
    assert summary["error_rate"] == 0 and summary["num_samples"] == 12 and summary["stops"] == {"answer": 12}
    assert [p["correct"] for p in summary["per_problem"]] == [0, 1, 4]
    assert summary["budget"]["max_tokens_total_per_sample"] == 4096 and summary["budget"]["max_turns"] == 8
    assert summary["sampling"] == {"samples": 4, "temperature": 0.7, "top_p": 1.0}
    out = tmp_path / "out"
    assert json.loads((out / "aime.json").read_text())["pass_at_k"] == summary["pass_at_k"]
    assert (out / "aime.png").stat().st_size > 1000
    recs = records(cfg)
    assert len(recs) == 12
    assert recs[0]["transcript"][1]["role"] == "tool" and recs[0]["transcript"][1]["content"].startswith("10")
    assert llm.script.history_violations == []


def test_hermes_fallback_sends_each_call_once(tmp_path, sandbox_server, problems_parquet, llm_factory):
    """The server checks the history it receives: a hermes call stays in the text, once."""
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), mode="hermes"))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, samples=2)
    summary = asyncio.run(evaluate(cfg))
    assert llm.script.history_violations == [] and summary["error_rate"] == 0 and summary["accuracy"] == 100.0
    first = records(cfg)[0]["transcript"][0]
    assert "<tool_call>" in first["content"] and "tool_calls" not in first


def test_sampling_and_budgets_default_to_the_grpo_configs_validation():
    from recipe.retool.train import compose

    cfg = EvalConfig(model="m", output="o.json").resolved()
    grpo = compose("retool_grpo_template")
    rollout = grpo.actor_rollout_ref.rollout
    # one pass@1: verl's validation and this evaluation sample alike, at the reference evaluation's 0.7
    assert (cfg.temperature, cfg.top_p) == (rollout.val_kwargs.temperature, rollout.val_kwargs.top_p) == (0.7, 1.0)
    assert (cfg.max_tokens, cfg.max_turns, cfg.max_tool_output_chars) == (
        grpo.data.max_response_length, rollout.multi_turn.max_assistant_turns, rollout.multi_turn.max_tool_response_length)
    assert (cfg.samples, cfg.concurrency) == (32, 64)  # pass@32 needs 32 samples; validation may take fewer
    # another config and its overrides, as given to the trainer; a flag wins over both
    up = EvalConfig(model="m", output="o.json", config="retool_grpo_upstream", max_turns=3,
                    config_overrides=["data.max_response_length=1000"]).resolved()
    assert (up.max_tokens, up.max_turns) == (1000, 3)
    with pytest.raises(EvalError, match="--config nosuch: cannot read the GRPO config"):
        EvalConfig(model="m", output="o.json", config="nosuch").resolved()
    with pytest.raises(EvalError, match="data.max_respons_length=1"):
        EvalConfig(model="m", output="o.json", config_overrides=["data.max_respons_length=1"]).resolved()


def test_the_cli_names_where_each_default_comes_from(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default the GRPO config's actor_rollout_ref.rollout.val_kwargs.temperature" in out
    cfg = _parse(["--model", "m", "--output", "o", "--config-override", "data.max_response_length=512",
                  "--temperature", "0.3"]).resolved()
    assert (cfg.max_tokens, cfg.temperature) == (512, 0.3)


def test_budget_is_the_total_across_turns(tmp_path, sandbox_server, problems_parquet, llm_factory):
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), mode="hermes"))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, samples=1)
    first_reply = len("Let me compute.\n<tool_call>\n" + json.dumps(
        {"name": "code_interpreter", "arguments": {"code": "print(100)"}}) + "\n</tool_call>")
    budget = first_reply + len("100") + TOOL_MESSAGE_OVERHEAD + 10  # the final turn gets 10 tokens
    summary = asyncio.run(evaluate(EvalConfig(**{**cfg.__dict__, "max_tokens": budget})))
    asked = [m for m in llm.script.max_tokens_seen if m != 1]  # without the preflight request
    assert sorted(asked) == [10] * 3 + [budget] * 3  # what was left, never the whole budget again
    assert summary["stops"] == {"budget": 3} and summary["accuracy"] == 0.0 and summary["error_rate"] == 0
    assert all(r["response_tokens"] <= budget for r in records(cfg))
    assert summary["budget"]["max_tokens_total_per_sample"] == budget


def test_a_call_on_the_last_turn_is_not_run(tmp_path, problems_parquet, llm_factory):
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4})))
    cfg = EvalConfig(model="stub", output=str(tmp_path / "o.json"), base_url=llm.url, data=str(problems_parquet),
                     sandbox_url="http://127.0.0.1:9", samples=1, max_turns=1, preflight=False)
    summary = asyncio.run(evaluate(cfg))  # the sandbox is unreachable: running code would fail the sample
    assert summary["stops"] == {"max_turns": 3} and summary["mean_tool_calls"] == 0 and summary["error_rate"] == 0


def test_context_window_overflow_is_a_wrong_answer_not_an_error(tmp_path, sandbox_server, problems_parquet,
                                                                llm_factory):
    prompt_len = len(rl_row("Problem alpha 0: compute.", "100", "aime24", 0, "test", "x")["prompt"][0]["content"])
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), context_limit=prompt_len + 20))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet)
    summary = asyncio.run(evaluate(cfg))
    assert summary["error_rate"] == 0 and summary["stops"] == {"context_length": 12}
    assert summary["accuracy"] == 0.0 and summary["pass_at_k"]["pass@1"] == 0.0
    assert summary["pass_at_k_coverage"]["pass@4"]["problems"] == 3


def test_persistent_server_failure_is_an_error_reported_per_k(tmp_path, sandbox_server, problems_parquet,
                                                              llm_factory):
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), fail_first=3, fail_always="alpha 2"))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, max_retries=2, preflight=False)
    summary = asyncio.run(evaluate(cfg))
    per = {p["index"]: p for p in summary["per_problem"]}
    assert per[0]["correct"] == 4 and per[1]["correct"] == 4  # the first three 500s were retried away
    assert per[2]["n"] == 0 and per[2]["errors"] == 4 and per[2]["solve_rate"] is None
    assert summary["error_rate"] == round(4 / 12, 4) and summary["errors"]["by_kind"] == {"server": 4}
    assert "InternalServerError" in summary["errors"]["dominant"] and "(4 of 4 errors)" in summary["errors"]["dominant"]
    assert summary["pass_at_k"]["pass@1"] == 100.0  # over the problems it covers ...
    assert summary["pass_at_k_coverage"]["pass@1"] == {"problems": 2, "of": 3}  # ... which are reported
    assert summary["accuracy"] == round(100 * 8 / 12, 2)  # errors count as wrong here
    assert summary["failed"] is True


def test_resume_never_repeats_or_loses_a_sample(tmp_path, sandbox_server, problems_parquet, llm_factory):
    script = Script(alpha({0: 4, 1: 4, 2: 4}))
    llm = llm_factory(script)
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, preflight=False)
    first = asyncio.run(evaluate(EvalConfig(**{**cfg.__dict__, "limit": 2})))  # "killed" after 2 problems
    assert first["num_samples"] == 8
    path = samples_path(cfg.output)
    with path.open("a") as fh:
        fh.write('{"problem": 2, "sample": 0, "status": "ok", "cor')  # torn last line of a killed run
    before = script.requests
    summary = asyncio.run(evaluate(cfg))
    assert script.requests - before == 4 * 2  # only problem 2's four samples, two requests each
    assert summary["num_samples"] == 12 and summary["pass_at_k"]["pass@1"] == 100.0
    keys = [(r["problem"], r["sample"]) for r in map(json.loads, path.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 12  # every line parses: the torn line was cut, nothing lost


@pytest.mark.parametrize("change", [{"temperature": 0.5}, {"model": "other"}, {"max_tokens": 1000},
                                    {"max_turns": 4}, {"no_tools": True}, {"top_p": 0.9}, "data"])
def test_a_mismatched_resume_is_refused_unless_asked(tmp_path, sandbox_server, problems_parquet, llm_factory, change):
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4})))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, samples=1, preflight=False)
    asyncio.run(evaluate(cfg))
    assert json.loads(identity_path(cfg.output).read_text())["model"] == "stub"
    if change == "data":
        other = tmp_path / "other.parquet"
        write_parquet([rl_row("Problem alpha 0: other.", "7", "aime24", 0, "test", "code_interpreter")], other)
        change = {"data": str(other)}
    changed = EvalConfig(**{**cfg.__dict__, **change, "samples": 2})
    before = llm.script.requests
    with pytest.raises(EvalError, match="holds samples of a different run"):
        asyncio.run(evaluate(changed))
    assert llm.script.requests == before  # refused before any request
    summary = asyncio.run(evaluate(EvalConfig(**{**changed.__dict__, "allow_resume_mismatch": True})))
    assert summary["resume_mismatch"]


def test_no_tools_offers_none_and_runs_none(tmp_path, problems_parquet, llm_factory):
    llm = llm_factory(Script(alpha({0: 4, 1: 2, 2: 0})))
    cfg = EvalConfig(model="stub", output=str(tmp_path / "o.json"), base_url=llm.url, data=str(problems_parquet),
                     sandbox_url="http://127.0.0.1:9", samples=4, no_tools=True)  # no sandbox needed
    summary = asyncio.run(evaluate(cfg))
    assert not any(llm.script.tools_seen)
    assert summary["accuracy"] == 50.0 and summary["mean_turns"] == 1 and summary["mean_tool_calls"] == 0
    assert summary["budget"]["tools"] is False
    # a model that writes a tool call anyway: the call is not run, the text is scored as written
    llm2 = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), tool_call_without_tools=True))
    summary = asyncio.run(evaluate(EvalConfig(**{**cfg.__dict__, "base_url": llm2.url,
                                                 "output": str(tmp_path / "o2.json")})))
    assert summary["stops"] == {"answer": 12} and summary["accuracy"] == 0.0 and summary["mean_tool_calls"] == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipe.retool.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_cli_fails_loudly_on_errors_and_keeps_the_console_clean(tmp_path, sandbox_server, problems_parquet,
                                                                 llm_factory):
    llm = llm_factory(Script(alpha({0: 4, 1: 4, 2: 4}), fail_always="alpha 2"))
    proc = run_cli("--model", "stub", "--output", str(tmp_path / "o.json"), "--base-url", llm.url,
                   "--sandbox-url", sandbox_server.url, "--data", str(problems_parquet), "--samples", "2",
                   "--max-retries", "0", "--max-tokens", "2000", "--max-turns", "3", "--temperature", "0.6",
                   "--top-p", "0.95", "--concurrency", "4", "--limit", "3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "dominant error: [server] InternalServerError" in proc.stderr
    assert "HTTP Request:" not in proc.stderr and "HTTP/1.1" not in proc.stderr
    summary = json.loads((tmp_path / "o.json").read_text())
    assert summary["config"]["max_tokens"] == 2000 and summary["sampling"]["top_p"] == 0.95
    assert summary["accuracy"] == round(100 * 4 / 6, 2) and summary["failed"] is True
    # the threshold is a flag
    proc = run_cli("--model", "stub", "--output", str(tmp_path / "o.json"), "--base-url", llm.url,
                   "--sandbox-url", sandbox_server.url, "--data", str(problems_parquet), "--samples", "2",
                   "--max-retries", "0", "--max-tokens", "2000", "--max-turns", "3", "--temperature", "0.6",
                   "--top-p", "0.95", "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_preflight_names_what_is_down(tmp_path, sandbox_server, problems_parquet, llm_factory):
    proc = run_cli("--model", "m", "--output", str(tmp_path / "o.json"), "--base-url", "http://127.0.0.1:9/v1",
                   "--sandbox-url", sandbox_server.url, "--data", str(problems_parquet), "--max-retries", "0")
    assert proc.returncode == 2 and "model server http://127.0.0.1:9/v1 did not answer a chat request" in proc.stderr
    llm = llm_factory(Script(alpha({0: 4})))
    proc = run_cli("--model", "m", "--output", str(tmp_path / "o.json"), "--base-url", llm.url,
                   "--sandbox-url", "http://127.0.0.1:9", "--data", str(problems_parquet))
    assert proc.returncode == 2 and "sandbox http://127.0.0.1:9 could not run" in proc.stderr, proc.stderr[-2000:]
    assert llm.script.requests == 1  # the one preflight request, no samples


def verl_view(tokenizer, prompt: list[dict], transcript: list[dict]) -> tuple[str, int]:
    """The transcript as verl's reward sees it: the chat-template rendering after the prompt,
    decoded with skip_special_tokens=True, and the trajectory's message count."""
    def plain(m: dict) -> dict:
        m = {k: v for k, v in m.items() if v is not None}
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        return m

    tools = [load_code_tool_schema()]
    head = tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + [plain(m) for m in transcript], tools=tools, tokenize=False)
    assert full.startswith(head)
    ids = tokenizer.encode(full[len(head):], add_special_tokens=False)
    rounds = sum(1 for i, m in enumerate(transcript[:-1]) if m["role"] == "assistant"
                 and transcript[i + 1]["role"] == "tool")
    return tokenizer.decode(ids, skip_special_tokens=True), 2 + 2 * rounds


@pytest.mark.parametrize("mode", ["native", "hermes"])
def test_training_reward_and_evaluation_agree(tmp_path, sandbox_server, problems_parquet, llm_factory,
                                              dev_tokenizer, mode):
    """One scoring rule: the eval's transcripts, scored through verl's reward call, give the same accuracy."""
    import pandas as pd

    llm = llm_factory(Script(alpha({0: 0, 1: 1, 2: 3}), mode=mode))
    cfg = config(tmp_path, llm, sandbox_server, problems_parquet, preflight=False)
    summary = asyncio.run(evaluate(cfg))
    rows = pd.read_parquet(problems_parquet)
    verl_acc = []
    for rec in records(cfg):
        row = rows.iloc[rec["problem"]]
        solution, num_turns = verl_view(dev_tokenizer, [dict(m) for m in row["prompt"]], rec["transcript"])
        extra_info = {**dict(row["extra_info"]), "turn_scores": [], "tool_rewards": [0.0] * rec["tool_calls"],
                      "num_turns": num_turns, "rollout_reward_scores": {}}
        r = compute_score(data_source=row["data_source"], solution_str=solution,
                          ground_truth=row["reward_model"]["ground_truth"], extra_info=extra_info)
        assert r["acc"] == float(rec["correct"]) and r["num_tool_calls"] == rec["tool_calls"] == 1, (rec, solution)
        verl_acc.append(r["acc"])
    assert round(100 * sum(verl_acc) / len(verl_acc), 2) == summary["accuracy"] == round(100 * 4 / 12, 2)


def test_shell_wrapper_and_bad_data(tmp_path, sandbox_server):
    bad = tmp_path / "bad.parquet"
    write_parquet([{"question": "q"}], bad)
    proc = subprocess.run(["bash", str(PACKAGE_DIR / "evaluate_model.sh"), "m", str(tmp_path / "o.json"),
                           "http://127.0.0.1:9/v1", sandbox_server.url, "EMPTY", "--data", str(bad)],
                          capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                          cwd=REPO)
    assert proc.returncode == 2 and "bad.parquet: missing column 'prompt'" in proc.stderr


def test_the_harness_sends_the_sandbox_token(tmp_path, token_server, problems_parquet, llm_factory, monkeypatch):
    llm = llm_factory(Script(alpha({0: 4})))
    cfg = config(tmp_path, llm, token_server, problems_parquet, samples=1, limit=1,
                 sandbox_token_env="RETOOL_TEST_SANDBOX_TOKEN")
    with pytest.raises(EvalError, match="RETOOL_TEST_SANDBOX_TOKEN"):
        asyncio.run(evaluate(cfg))
    monkeypatch.setenv("RETOOL_TEST_SANDBOX_TOKEN", token_server.token)
    summary = asyncio.run(evaluate(cfg))
    assert summary["errors"]["count"] == 0 and summary["mean_tool_calls"] == 1
