"""recipe.retool.pipeline: the production pipeline on one node, run here on the bundled samples (the GPU
stages skipped, with their commands), and its commands the same as the cloud plan's."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from recipe.retool.cloud import launcher
from recipe.retool.experiment import Layout, commands, load_experiment
from recipe.retool.pipeline import main


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_every_cpu_stage_runs_and_the_gpu_stages_show_their_commands(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("recipe.retool.pipeline.gpu_count", lambda: 0)  # as on CI, whatever the host has
    args = ["--out", str(tmp_path), "data.sample=true", f"model={tiny_model_dir}", "eval.models=[base,grpo]"]
    assert main(args) == 0
    stages = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["stages"]}
    assert [stages[s]["status"] for s in ("data", "prefilter", "sandbox", "sft", "merge sft", "grpo", "merge grpo",
                                          "eval base", "eval grpo")] == [
        "done", "done", "done", "skipped", "skipped", "skipped", "skipped", "skipped", "skipped"]
    # the commands a GPU node runs: SFT from the base model, GRPO from SFT's run, a sandbox for GRPO
    sft_cmd = stages["sft"]["detail"].split("```\n")[1].strip()
    assert sft_cmd.startswith(f"{__import__('sys').executable} -m recipe.retool.train sft {tiny_model_dir} ")
    grpo_lines = stages["grpo"]["detail"].split("```\n")[1].strip().splitlines()
    assert grpo_lines[0].endswith("-m recipe.retool.sandbox serve --port 8080 &")
    assert grpo_lines[1].startswith("RETOOL_SANDBOX_URL=http://localhost:8080 ")
    assert f"{tmp_path}/checkpoints/sft-experiments/" in grpo_lines[1]
    assert "recipe.retool.evaluate" in stages["eval grpo"]["detail"] and "sglang.launch_server" in stages["eval grpo"]["detail"]
    for name in ("sft/train.parquet", "rl/train.parquet", "rl/aime24.parquet"):
        assert len(pd.read_parquet(tmp_path / "data" / name)) > 0
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[") and " in " in line]
    assert len(console) == 9, console
    # a rerun resumes: the data and the prefiltered files are kept
    before = (tmp_path / "data" / "rl" / "train.parquet").stat().st_mtime_ns
    assert main(args) == 0
    assert (tmp_path / "data" / "rl" / "train.parquet").stat().st_mtime_ns == before
    assert "done earlier" in (tmp_path / "report.md").read_text()
    # a GRPO run's consistency (here a metrics file as a GPU node's run leaves it) is on the report
    from recipe.retool.metrics import metrics_path
    from recipe.retool.stages import run_dir

    exp = load_experiment(None, args[2:])  # as the pipeline reads it
    grpo_run = Path(run_dir(tmp_path / "checkpoints", "grpo", exp.grpo_name))
    grpo_run.mkdir(parents=True)
    metrics_path(grpo_run).write_text(json.dumps({"step": 1, "data": {
        "consistency/logprob_diff/mean": 0.002, "consistency/logprob_diff/max": 0.31,
        "consistency/logprob_diff/share_above_tol": 0.001, "consistency/token_drift/checked": 64.0,
        "consistency/token_drift/mismatched": 0.0}}) + "\n")
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "GRPO: rollout vs trainer log-probs" in report and "max 3.10e-01" in report
    assert "GRPO: token drift against the chat template: 0 of 64 checked" in report
    # another GRPO budget prefilters the RL files again, and keeps the SFT file
    assert main([*args, "grpo.overrides=[data.max_prompt_length=300]"]) == 0
    figures = json.loads((tmp_path / "report.json").read_text())["stages"][1]["figures"]
    assert "done earlier" in figures["sft/train.parquet"] and "done earlier" not in figures["rl/train.parquet"], figures


def test_the_pipeline_and_the_cloud_plan_run_the_same_commands():
    exp = load_experiment(None)
    local = commands(exp, Layout(data=launcher.DATA_DIR, checkpoints=launcher.CKPT_DIR, models=launcher.MODELS_DIR))
    plan = launcher.plan(exp)
    assert plan["prep_dataset"]["commands"] == [local["data"], *local["prefilter"]]
    assert plan["train_sft"]["commands"] == [local["sft"]] and plan["train_grpo"]["commands"] == [local["grpo"]]
    assert plan["evaluate"]["commands"][1][:4] == local["eval"]("x", "y")[:4]
