"""recipe.retool.prefilter_dataset: token-length filtering with the chat template, in parallel."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from recipe.retool import PACKAGE_DIR
from recipe.retool.data import DataError, write_parquet
from recipe.retool.prefilter_dataset import prefilter


def test_rl_prompt_lengths_match_chat_template_with_tools(sample_data, dev_tokenizer, dev_tokenizer_dir, tmp_path):
    from recipe.retool.data import load_code_tool_schema

    df = pd.read_parquet(sample_data["rl"])
    prompt = [dict(m) for m in df["prompt"].iloc[3]]
    expected = len(dev_tokenizer.apply_chat_template(prompt, tools=[load_code_tool_schema()],
                                                     add_generation_prompt=True, tokenize=True)["input_ids"])
    res = prefilter(sample_data["rl"], tmp_path / "o.parquet", str(dev_tokenizer_dir), workers=1, progress=False)
    assert res.prompt_lengths[3] == expected
    assert res.kept == len(df) and res.dropped == 0


def test_sft_drop_by_response_keeps_dropped_rows(sample_data, dev_tokenizer_dir, tmp_path):
    full = prefilter(sample_data["sft"], tmp_path / "all.parquet", str(dev_tokenizer_dir), workers=1, progress=False)
    assert (full.response_lengths > 0).all() and (full.prompt_lengths > 0).all()
    cut = int(sorted(full.response_lengths)[len(full.response_lengths) // 2])
    out = tmp_path / "kept.parquet"
    res = prefilter(sample_data["sft"], out, str(dev_tokenizer_dir), max_response_tokens=cut, workers=2,
                    chunk_size=5, progress=False)
    assert res.kept == int((full.response_lengths <= cut).sum()) and res.dropped > 0
    kept, dropped = pd.read_parquet(out), pd.read_parquet(tmp_path / "kept.dropped.parquet")
    assert len(kept) + len(dropped) == res.kept + res.dropped
    assert (dropped["response_tokens"] > cut).all()
    # parallel (2 workers, small chunks) and serial measure the same lengths, in row order
    assert (res.response_lengths == full.response_lengths).all()


def test_bad_input_names_file_row_and_field(tmp_path, dev_tokenizer_dir):
    src = tmp_path / "weird.parquet"
    write_parquet([{"text": "a"}], src)
    with pytest.raises(DataError, match="weird.parquet: expected a 'messages'"):
        prefilter(src, tmp_path / "o.parquet", str(dev_tokenizer_dir), workers=1, progress=False)
    src2 = tmp_path / "bad_prompt.parquet"
    write_parquet([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": None}], src2)
    with pytest.raises(DataError, match=r"bad_prompt.parquet, row 1, field 'prompt'"):
        prefilter(src2, tmp_path / "o.parquet", str(dev_tokenizer_dir), workers=1, progress=False)


def test_shell_wrapper_keeps_positional_arguments(sample_data, dev_tokenizer_dir, tmp_path):
    out = tmp_path / "f.parquet"
    proc = subprocess.run(
        ["bash", str(PACKAGE_DIR / "preprocess_data.sh"), str(sample_data["aime24"]), str(out), str(dev_tokenizer_dir),
         "--max-prompt-tokens", "10", "--workers", "1"],
        capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "kept 0/12 rows, dropped 12" in proc.stdout
    assert len(pd.read_parquet(out)) == 0 and len(pd.read_parquet(tmp_path / "f.dropped.parquet")) == 12


@pytest.mark.parametrize("tokenizer, message", [
    ("/no/such/tokenizer", "--tokenizer /no/such/tokenizer: no such directory"),
    ("Nobody/no-such-model", "--tokenizer Nobody/no-such-model: not a local directory, not in the Hugging Face "
                             "cache, and the hub cannot be reached (HF_HUB_OFFLINE is set)"),
])
def test_a_tokenizer_that_cannot_load_is_one_line_before_any_worker(sample_data, tmp_path, tokenizer, message):
    import os

    proc = subprocess.run([sys.executable, "-m", "recipe.retool.prefilter_dataset", "--input", str(sample_data["rl"]),
                           "--output", str(tmp_path / "o.parquet"), "--tokenizer", tokenizer, "--workers", "2"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ERROR __main__: {message}"], proc.stderr[-3000:]
    assert not (tmp_path / "o.parquet").exists()


def test_a_file_as_tokenizer_is_refused(sample_data, tmp_path):
    with pytest.raises(DataError, match="expected a tokenizer directory or a Hugging Face id, got a file"):
        prefilter(sample_data["rl"], tmp_path / "o.parquet", str(sample_data["rl"]), workers=2, progress=False)


def test_the_budget_belongs_to_the_config_that_trains_on_the_data():
    from recipe.retool.prefilter_dataset import Budget, budget_for
    from recipe.retool.train import compose

    sft, grpo = compose("retool_sft"), compose("retool_grpo_template")
    assert budget_for("sft") == Budget(total=int(sft.data.max_length), source="data.max_length of retool_sft")
    assert budget_for("rl").prompt == int(grpo.data.max_prompt_length) and budget_for("rl").response is None
    assert budget_for("sft", overrides=["data.max_length=4096"]).total == 4096
    assert budget_for("rl", "retool_grpo_upstream").source == "data.max_prompt_length of retool_grpo_upstream"
    assert budget_for("sft", max_response_tokens=7) == Budget(response=7, source="set on the command line")
    with pytest.raises(DataError, match="--config no_such_config: cannot compose it"):
        budget_for("sft", "no_such_config")


def long_trace(digits: int) -> dict:
    """An SFT row whose tool output is ``digits`` digits long (one token each with the dev tokenizer)."""
    from recipe.retool.data import load_code_tool_schema

    call = {"id": "c0", "type": "function", "function": {"name": "code_interpreter", "arguments": '{"code": "print(7)"}'}}
    return {"messages": [{"role": "user", "content": "Compute 7."},
                         {"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": "7" * digits},
                         {"role": "assistant", "content": "\\boxed{7}"}],
            "tools": [load_code_tool_schema()]}


def test_the_planned_sft_prefilter_keeps_a_trace_sft_at_16k_accepts(tmp_path, dev_tokenizer_dir):
    """The cloud plan prefilters ReTool-SFT with retool_sft's max_length (16k), not the RL budget:
    a trace with a 6,000-token response is kept, one past 16k is dropped."""
    from recipe.retool.cloud import launcher

    exp = launcher.load_experiment(launcher.REPO_ROOT / "config" / "experiments" / "default.yaml", environ={})
    planned = next(c for c in launcher.prep_commands(exp) if "recipe.retool.prefilter_dataset" in c
                   and c[c.index("--input") + 1].endswith("sft/train.parquet"))
    src = tmp_path / "sft.parquet"
    write_parquet([long_trace(6000), long_trace(17000), long_trace(10)], src)
    cmd = list(planned)
    cmd[cmd.index("--input") + 1], cmd[cmd.index("--output") + 1] = str(src), str(tmp_path / "out.parquet")
    cmd[cmd.index("--tokenizer") + 1] = str(dev_tokenizer_dir)
    proc = subprocess.run([sys.executable, *cmd[1:], "--workers", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept 2/3 rows" in proc.stdout and "prompt + response <= 16384 tokens (data.max_length of retool_sft" \
        in proc.stdout, proc.stdout
    kept, dropped = pd.read_parquet(tmp_path / "out.parquet"), pd.read_parquet(tmp_path / "out.dropped.parquet")
    assert sorted(len(m[2]["content"]) for m in kept["messages"]) == [10, 6000]
    assert dropped["response_tokens"].iloc[0] > 16384


def test_overrides_reach_the_budget_as_they_reach_the_trainer(sample_data, dev_tokenizer_dir, tmp_path):
    out = tmp_path / "o.parquet"
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.prefilter_dataset", "--input", str(sample_data["rl"]),
                           "--output", str(out), "--tokenizer", str(dev_tokenizer_dir), "--workers", "1",
                           "--config", "retool_grpo_upstream", "data.max_prompt_length=10"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prompt <= 10 tokens (data.max_prompt_length of retool_grpo_upstream with data.max_prompt_length=10)" \
        in proc.stdout and len(pd.read_parquet(out)) == 0
