"""verl's real GRPO loop (main_ppo, v1 trainer) in miniature on CPU: our template, tool, sandbox and
reward, with the transformers rollout backend and the CPU platform plugin (scripts/mini_grpo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mini_grpo_trains_checkpoints_and_resumes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/mini_grpo.py", "--out", str(tmp_path), "--device", "cpu",
                           "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())

    assert summary["teach"]["greedy_reply_is_tool_call"]
    step1, step2 = summary["run1"]["steps"]["1"], summary["run2_resumed"]["steps"]["2"]
    assert summary["checkpoints"] == ["global_step_1", "global_step_2"]  # saved, then resumed and saved again
    for step, run in ((step1, summary["run1"]), (step2, summary["run2_resumed"])):
        # rollouts called our code tool on our sandbox: user, assistant, tool, assistant … turns
        assert run["sandbox_code_runs"] > 0 and step["num_turns/mean"] > 2
        # our reward: a wrong answer with tool calls scores above -1 (tool bonus), never above +1
        assert -1.0 < step["critic/score/max"] <= 1.0
        # the rollout backend samples from the actor's distribution (on-policy): with both sides in
        # fp32 on the CPU, each token's probability agrees to rounding; a stale weight sync, a
        # checkpoint restored into one side only, or log-probs shifted against the tokens differ by far more
        assert summary["overrides"] and step["training/rollout_probs_diff_max"] < 1e-3
        assert all(k in step for k in ("timing_s/gen", "timing_s/update_actor", "timing_s/update_weights"))
        assert run["rollout_server"] and run["rollout_server"][0]["requests"] > 0


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_grpo", ROOT / "scripts" / "mini_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_states_the_defaults_the_parser_uses():
    mini = _load_script()
    parser = mini.build_parser()
    proc = subprocess.run([sys.executable, "scripts/mini_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for action in parser._actions:
        if isinstance(action.default, (int, str)) and not isinstance(action.default, bool) and action.dest != "help":
            assert f"(default: {action.default})" in text, action.dest
    assert "(default: 150)" in text and "few hundred" not in text  # the docstring no longer states its own count


def test_each_training_step_is_reported_while_the_run_goes_on(tmp_path, capsys):
    """run_logged streams a real process's output to the log and prints a line per verl step line."""
    mini = _load_script()
    code = ("import time\n"
            "print('(TaskRunner pid=7) Ray started', flush=True)\n"
            "for s in (1, 2):\n"
            "    time.sleep(0.2)\n"
            "    print(f'(TaskRunner pid=7) step:{s} - timing_s/step:0.2 - critic/score/mean:-0.9{s}', flush=True)\n")
    rc, seconds = mini.run_logged([sys.executable, "-c", code], tmp_path / "run.log", None, "run 1", 2)
    out = capsys.readouterr().out
    assert rc == 0 and seconds >= 0.4
    assert "run 1: step 1/2 done after" in out and "score mean -0.910" in out
    assert "run 1: step 2/2 done after" in out and "score mean -0.920" in out
    assert "Ray started" in (tmp_path / "run.log").read_text() and "Ray started" not in out


def test_phase_means_leave_the_warm_up_step_out():
    mini = _load_script()
    steps = {1: {"timing_s/step": 30.0, "timing_s/gen": 20.0, "timing_s/old_log_prob": 4.0, "timing_s/ref": 1.0,
                 "timing_s/update_actor": 5.0},
             2: {"timing_s/step": 10.0, "timing_s/gen": 6.0, "timing_s/old_log_prob": 1.0, "timing_s/ref": 0.5,
                 "timing_s/update_actor": 2.0},
             3: {"timing_s/step": 12.0, "timing_s/gen": 7.0, "timing_s/old_log_prob": 2.0, "timing_s/ref": 0.5,
                 "timing_s/update_actor": 2.5}}
    assert mini.phase_means(steps) == {"step": 11.0, "gen": 6.5, "old_log_prob": 1.5, "ref": 0.5, "update_actor": 2.25}
    assert mini.phase_means({1: steps[1]})["update_actor"] == 5.0  # a single step stands for itself
    assert mini.phase_means({}) == {}


def test_a_full_size_model_needs_the_gpu(tmp_path):
    for extra in ([], ["--device", "gpu"], ["--no-teach"]):
        proc = subprocess.run([sys.executable, "scripts/mini_grpo.py", "--out", str(tmp_path), "--shape", "1.5b", *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "--shape 1.5b needs --device gpu and --no-teach" in proc.stderr, extra
    assert not any(tmp_path.iterdir())  # refused before anything was built
