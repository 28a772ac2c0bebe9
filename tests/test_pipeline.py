"""recipe.retool.pipeline --full: the real-scale path on CPU with the bundled samples (GPU stages skipped)."""

from __future__ import annotations

import json

import pandas as pd

from recipe.retool.pipeline import main


def test_pipeline_runs_every_cpu_stage_and_writes_a_report(tmp_path, monkeypatch):
    monkeypatch.setattr("recipe.retool.pipeline.gpu_count", lambda: 0)  # as on CI, whatever the host has
    assert main(["--full", "--sample", "--out", str(tmp_path)]) == 0
    stages = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())}
    assert [stages[s]["status"] for s in ("data", "prefilter", "sandbox", "sft", "grpo", "eval")] == [
        "done", "done", "done", "skipped", "skipped", "skipped"]
    assert "torch.distributed.run" in stages["sft"]["detail"] and "verl.trainer.main_ppo" in stages["grpo"]["detail"]
    assert "needs a CUDA GPU" in stages["sft"]["detail"]
    for name in ("sft/train.parquet", "rl/train.parquet", "rl/aime24.parquet"):
        assert len(pd.read_parquet(tmp_path / "data" / name)) > 0
    report = (tmp_path / "report.md").read_text()
    assert "| sandbox | done |" in report and "| sft | skipped |" in report
    # a rerun resumes: the prepared data is reused, not rebuilt
    before = (tmp_path / "data_raw" / "rl" / "train.parquet").stat().st_mtime_ns
    assert main(["--full", "--sample", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "data_raw" / "rl" / "train.parquet").stat().st_mtime_ns == before
    assert "(cached)" in (tmp_path / "report.md").read_text()
