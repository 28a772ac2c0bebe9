"""verl's real GRPO loop (main_ppo, v1 trainer) in miniature on CPU: our template, tool, sandbox and
reward, with the transformers rollout backend and the CPU platform plugin (scripts/lab/mini_grpo.py);
the recipe's consistency metrics in every step's metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.retool.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mini_grpo_trains_checkpoints_and_resumes_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/lab/mini_grpo.py", "--out", str(tmp_path), "--device", "cpu",
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
        # the recipe's verl plugin: the reward's late checks counted in each step's metrics (none here)
        assert step["reward/verify_timeouts"] == 0.0
        assert run["rollout_server"] and run["rollout_server"][0]["requests"] > 0

    # the consistency metrics of every step (recipe/retool/consistency.py), from verl's metrics file
    steps = read_metrics(tmp_path / "ckpt" / "grpo-experiments" / "mini")
    assert sorted(steps) == [1, 2]
    for step in steps.values():
        # log-probs: hf_dev and the actor both in fp32 on the CPU agree to rounding on every token
        assert step["consistency/logprob_diff/max"] < 1e-3 and step["consistency/logprob_diff/mean"] < 1e-4
        assert step["consistency/logprob_diff/share_above_tol"] == 0.0
        # token drift: every trajectory checked (drift_sample ≥ the step's trajectories), none drifts
        assert step["consistency/token_drift/checked"] > 0 and step["consistency/token_drift/mismatched"] == 0.0
        assert "consistency/token_drift/first_position" not in step
        # tool-call health: the taught model calls the tool; every share is logged
        assert step["consistency/tool_calls/per_trajectory"] > 0
        assert 0.0 <= step["consistency/tool_calls/invalid_turn_share"] <= 1.0
        assert {"consistency/cut/turn_limit_share", "consistency/cut/length_limit_share"} <= set(step)
    assert not (tmp_path / "ckpt" / "grpo-experiments" / "mini" / "token_drift.jsonl").exists()


def test_help_states_its_defaults():
    proc = subprocess.run([sys.executable, "scripts/lab/mini_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "(default: 150)" in text and "few hundred" not in text  # the docstring no longer states its own count


def test_a_full_size_model_needs_the_gpu(tmp_path):
    for extra in ([], ["--device", "gpu"], ["--no-teach"]):
        proc = subprocess.run([sys.executable, "scripts/lab/mini_grpo.py", "--out", str(tmp_path), "--shape", "1.5b", *extra],
                              cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and "--shape 1.5b needs --device gpu and --no-teach" in proc.stderr, extra
    assert not any(tmp_path.iterdir())  # refused before anything was built
