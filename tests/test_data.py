"""recipe.retool.data: conversions, error reporting, and loading by verl's own dataset classes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from recipe.retool import data
from recipe.retool.data import DataError, RowError, split_assistant_turn


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RETOOL_ROW = {
    "messages": [
        {"role": "user", "content": "What is 6*7?"},
        {
            "role": "assistant",
            "content": "Compute.\n<code>\n```python\nprint(6*7)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n"
            "Check.\n<code>print(42 % 5)</code><interpreter>2</interpreter>\nDone.\n<answer>\\boxed{42}</answer>",
        },
    ]
}


def test_split_assistant_turn_builds_tool_calls_and_tool_turns():
    turns = split_assistant_turn(RETOOL_ROW["messages"][1]["content"], "code_interpreter")
    assert [t["role"] for t in turns] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert turns[0]["content"] == "Compute."
    assert turns[0]["tool_calls"][0]["function"] == {"name": "code_interpreter", "arguments": {"code": "print(6*7)"}}
    assert turns[2]["tool_calls"][0]["function"]["arguments"]["code"] == "print(42 % 5)"  # no fence
    assert turns[1]["content"] == "42" and turns[3]["content"] == "2"
    assert turns[4]["content"] == "Done.\n<answer>\\boxed{42}</answer>"


@pytest.mark.parametrize(
    "content, expected",
    [
        ("a <code>print(1)</code> then nothing", "<interpreter>"),
        ("a <code>print(1)", "closed"),
        ("<code>print(1)</code><interpreter>1</interpreter>", "final assistant answer"),
        ("<code>```python\n```</code><interpreter>x</interpreter> ok", "non-empty <code>"),
    ],
)
def test_split_assistant_turn_rejects_malformed(content, expected):
    with pytest.raises(RowError, match=expected):
        split_assistant_turn(content, "code_interpreter")


def test_sft_rejects_bad_rows_with_reasons_and_keeps_them(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<code>x</code>"}]}
    wrong_role = {"messages": [{"role": "robot", "content": "q"}]}
    src = write_jsonl(tmp_path / "sft.jsonl", [RETOOL_ROW, bad, wrong_role, RETOOL_ROW])
    out = tmp_path / "out" / "sft.parquet"
    report = data.prepare_sft(str(src), out)
    assert (report.total, report.written, len(report.rejected)) == (4, 2, 2)
    rejects = [json.loads(line) for line in Path(str(out) + ".rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1, 2]
    assert str(src) in rejects[0]["reason"] and "row 1" in rejects[0]["reason"]
    assert rejects[0]["field"] == "messages[1].content" and "<interpreter>" in rejects[0]["reason"]
    assert rejects[1]["field"] == "messages[0].role"
    assert rejects[0]["data"] == bad  # the rejected row itself is kept, nothing is lost
    df = pd.read_parquet(out)
    assert df["tools"].iloc[0][0]["function"]["name"] == "code_interpreter"


def test_missing_column_and_unreadable_source_name_the_file(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"x\.jsonl: missing column 'messages'"):
        data.prepare_sft(str(src), tmp_path / "o.parquet")
    with pytest.raises(DataError, match=r"x\.jsonl: missing column 'prompt'"):
        data.prepare_rl(str(src), tmp_path / "o.parquet")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: cannot load"):
        data.prepare_rl(str(broken), tmp_path / "o.parquet")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match=r"c\.txt: unsupported file type '\.txt'"):
        data.load_source(str(tmp_path / "c.txt"))


def test_rl_dedups_strips_dapo_wrapper_and_reports_empty_answers(tmp_path):
    content = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nFind 1+1.\n\n"
               'Remember to put your answer on its own line after "Answer:".')
    row = {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": "2"}}
    spaced = {"prompt": [{"role": "user", "content": content.replace("Find 1+1.", "Find  1+1. ")}],
              "reward_model": {"ground_truth": "2"}}
    empty = {"prompt": [{"role": "user", "content": "Find 2+2."}], "reward_model": {"ground_truth": " "}}
    src = write_jsonl(tmp_path / "dapo.jsonl", [row, spaced, empty, row])
    out = tmp_path / "rl.parquet"
    report = data.prepare_rl(str(src), out)
    assert (report.written, report.duplicates, len(report.rejected)) == (1, 2, 1)
    assert report.rejected[0]["field"] == "ground_truth"
    df = pd.read_parquet(out)
    prompt = df["prompt"].iloc[0][0]["content"]
    assert prompt.endswith("Find 1+1.") and "Answer:" not in prompt and "\\boxed{}" in prompt
    assert df["agent_name"].iloc[0] == "tool_agent"
    assert df["reward_model"].iloc[0]["ground_truth"] == "2"
    assert df["extra_info"].iloc[0]["tools_kwargs"]["code_interpreter"]["create_kwargs"]["ground_truth"] == "2"


def test_val_accepts_aime_columns_case_insensitively(tmp_path):
    src = write_jsonl(tmp_path / "aime.jsonl", [{"ID": "1", "Problem": "p1", "Answer": 204}])
    src2 = write_jsonl(tmp_path / "aime25.jsonl", [{"id": "2", "problem": "p2", "answer": "033"}])
    data.prepare_val(str(src), tmp_path / "a.parquet", data_source="aime24")
    data.prepare_val(str(src2), tmp_path / "b.parquet", data_source="aime25")
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert a["reward_model"].iloc[0]["ground_truth"] == "204" and a["data_source"].iloc[0] == "aime24"
    assert b["reward_model"].iloc[0]["ground_truth"] == "033" and b["data_source"].iloc[0] == "aime25"


def test_prepare_all_resumes_without_redoing(tmp_path):
    outs = data.prepare_all(tmp_path, data.SAMPLE_SOURCES)
    mtimes = {k: p.stat().st_mtime_ns for k, p in outs.items()}
    outs["rl"].unlink()  # as if interrupted before the RL file was written
    data.prepare_all(tmp_path, data.SAMPLE_SOURCES)
    assert outs["rl"].exists()
    assert outs["sft"].stat().st_mtime_ns == mtimes["sft"]


def test_cli_exit_code_and_message_on_bad_input(tmp_path, capsys, caplog):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}])
    assert data.main(["rl", "--source", str(src), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "bad.jsonl: missing column 'prompt'" in caplog.text


def test_verl_multiturn_sft_dataset_loads_sft_output(sample_data, dev_tokenizer):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    ds = MultiTurnSFTDataset(str(sample_data["sft"]), dev_tokenizer, OmegaConf.create({"max_length": 1024}))
    item = ds[0]
    ids = item["input_ids"][item["attention_mask"].bool()]
    text = dev_tokenizer.decode(ids)
    assert "<tool_call>" in text and "<tool_response>" in text and "code_interpreter" in text
    # loss only on assistant tokens: the tool output (interpreter text) must be masked out
    trained = dev_tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
    assert "\\boxed{" in trained and "<tool_response>" not in trained


def test_verl_rlhf_dataset_loads_rl_output_with_tools(sample_data, dev_tokenizer, monkeypatch):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from recipe.retool.settings import DEFAULT_SANDBOX_URL, SANDBOX_URL_ENV

    monkeypatch.setenv(SANDBOX_URL_ENV, DEFAULT_SANDBOX_URL)  # what recipe.retool.train gives verl's processes

    cfg = OmegaConf.create({"max_prompt_length": 2048, "return_raw_chat": True,
                            "tool_config_path": str(data.TOOL_CONFIG_PATH)})
    for key in ("rl", "aime24"):
        ds = RLHFDataset(str(sample_data[key]), dev_tokenizer, cfg)
        item = ds[0]
        assert item["agent_name"] == "tool_agent"
        assert set(item["tools_kwargs"]) == {"code_interpreter"}
        assert item["raw_prompt"][0]["role"] == "user"
        assert len(ds.tool_schemas) == 1, "the tool config must load (our tool class importable)"
