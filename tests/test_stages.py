"""The one command builder and stage runner: commands every entry point shares, a run that stops at
the first failure and always cleans up, and the report it leaves."""

from __future__ import annotations

import json

import pytest

from recipe.retool.stages import (
    Runner,
    Stage,
    eval_command,
    merge_command,
    prefilter_commands,
    run_dir,
    serve_command,
    train_command,
    write_report,
)


def test_commands_name_the_stage_modules_and_their_arguments():
    assert train_command("grpo", "M", "D", "O", "exp", "retool_grpo_template", ["a=1"]) == [
        "python", "-m", "recipe.retool.train", "grpo", "M", "D", "O", "exp", "--config", "retool_grpo_template", "a=1"]
    assert run_dir("O", "grpo", "exp") == "O/grpo-experiments/exp"
    assert merge_command("S")[-4:] == ["--local_dir", "S", "--target_dir", "S/merged_hf"]
    pre = prefilter_commands("R", "D", "tok", {"sft": ("retool_sft", ["x=1"]), "grpo": ("g", [])})
    assert [c[c.index("--input") + 1] for c in pre] == ["R/sft/train.parquet", "R/rl/train.parquet", "R/rl/aime24.parquet"]
    assert pre[0][-3:] == ["--config", "retool_sft", "x=1"] and pre[1][-2:] == ["--config", "g"]
    assert "--tool-call-parser" in serve_command("sglang", "P", "n", 8000, 2) and "--tp" in serve_command("sglang", "P", "n", 8000, 2)
    assert "--enable-auto-tool-choice" in serve_command("vllm", "P", "n", 8000, 2)
    with pytest.raises(ValueError, match="expected one of"):
        serve_command("tgi", "P", "n", 8000, 1)
    assert eval_command("n", "o.json", "B", "S", "d.parquet", ["--samples", 4])[-2:] == ["--samples", "4"]


def test_the_runner_stops_at_the_first_failure_and_always_cleans_up(tmp_path, capsys):
    ran, cleaned = [], []

    def ok(name):
        return lambda: ran.append(name) or Stage(name, "done", figures={"n": 1})

    def boom():
        raise RuntimeError("disk full")

    runner = Runner()
    assert not runner.run_all([("a", ok("a")), ("b", boom), ("c", ok("c"))], cleanup=lambda: cleaned.append(1))
    assert ran == ["a"] and cleaned == [1] and [s.status for s in runner.stages] == ["done", "failed"]
    assert runner.stages[1].detail == "RuntimeError: disk full"
    out = capsys.readouterr().out
    assert "[a] done in 0s: n 1" in out and "[b] failed in 0s: RuntimeError: disk full" in out
    report = write_report(tmp_path, "T", runner.stages, ["head line"], {"k": 1}, 2.0)
    text = report.read_text()
    assert text.startswith("# T\n\nhead line") and "| b | failed |" in text and "## b: failed" in text
    assert json.loads((tmp_path / "report.json").read_text())["k"] == 1
