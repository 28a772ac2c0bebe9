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
