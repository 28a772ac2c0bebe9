"""recipe.retool.pipeline --full: the real-scale path on CPU with the bundled samples (GPU stages skipped)."""

from __future__ import annotations

import json
import shutil

import pandas as pd

from recipe.retool.pipeline import main


def test_pipeline_runs_every_cpu_stage_and_writes_a_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("recipe.retool.pipeline.gpu_count", lambda: 0)  # as on CI, whatever the host has
    assert main(["--full", "--sample", "--out", str(tmp_path)]) == 0
    stages = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert [stages[s]["status"] for s in ("data", "prefilter", "sandbox", "sft", "grpo", "eval")] == [
        "done", "done", "done", "skipped", "skipped", "skipped"]
    assert "torch.distributed.run" in stages["sft"]["detail"] and "verl.trainer.main_ppo" in stages["grpo"]["detail"]
    assert "needs a CUDA GPU" in stages["sft"]["detail"]
    # the printed GPU commands: SFT from the base model, GRPO from the SFT output, with a sandbox URL
    sft_cmd = stages["sft"]["detail"].split("```\n")[1].strip()
    assert sft_cmd.startswith("python -m recipe.retool.train sft Qwen/Qwen2.5-7B-Instruct ")
    grpo_lines = stages["grpo"]["detail"].split("```\n")[1].strip().splitlines()
    sft_out = tmp_path / "checkpoints" / "sft-experiments" / "demo-sft"
    assert grpo_lines[0] == "python -m recipe.retool.sandbox serve --port 8080 &"
    assert grpo_lines[1].startswith(f"RETOOL_SANDBOX_URL=http://127.0.0.1:8080 python -m recipe.retool.train grpo {sft_out} ")
    # ... and they say the data was filtered with the stand-in tokenizer
    for stage in ("prefilter", "sft", "grpo"):
        assert "offline stand-in tokenizer" in stages[stage]["detail"], stage
    assert "--tokenizer Qwen/Qwen2.5-7B-Instruct" in stages["grpo"]["detail"]
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(console) == 6 and not [line for line in console if line.rstrip().endswith(":")], console
    for name in ("sft/train.parquet", "rl/train.parquet", "rl/aime24.parquet"):
        assert len(pd.read_parquet(tmp_path / "data" / name)) > 0
    report = (tmp_path / "report.md").read_text()
    assert "| sandbox | done |" in report and "| sft | skipped |" in report
    # a rerun resumes: the prepared data is reused, not rebuilt
    before = (tmp_path / "data_raw" / "rl" / "train.parquet").stat().st_mtime_ns
    assert main(["--full", "--sample", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "data_raw" / "rl" / "train.parquet").stat().st_mtime_ns == before
    assert "(cached)" in (tmp_path / "report.md").read_text()
    # another tokenizer filters again instead of reusing data filtered with the stand-in
    tokenizer = shutil.copytree(tmp_path / "dev_tokenizer", tmp_path / "another_tokenizer")
    assert main(["--full", "--sample", "--out", str(tmp_path), "--tokenizer", str(tokenizer)]) == 0
    stages = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert "(cached)" not in str(stages["prefilter"]["figures"]) and "stand-in" not in stages["grpo"]["detail"]
