"""recipe/retool/cloud/cost_estimate.py reads the recipe's configs and scales with them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from recipe.retool.cloud import cost_estimate as ce

REPO = Path(__file__).resolve().parents[2]


def _args(**kw):
    defaults = dict(grpo_steps=400, peak_tflops=796.0, train_mfu=0.30, sft_conversations=2000, sft_mean_tokens=1800,
                    mean_prompt_tokens=250, mean_response_tokens=3000, val_problems=30, rollout_tok_s=8000.0,
                    step_overhead_s=15.0, usd_per_gpu_hour=None, cross_node_efficiency=0.85)
    return type("Args", (), {**defaults, **kw})()


def test_the_estimate_follows_the_configs():
    sft = OmegaConf.load(ce.CONFIG / "retool_sft.yaml")
    grpo = OmegaConf.load(ce.CONFIG / "retool_grpo_template.yaml")
    base = ce.grpo_step_s(_args(), grpo, ce.MODEL_7B, 8000, 1)
    grpo.actor_rollout_ref.rollout.n *= 2  # twice the samples per prompt: twice the work per step
    doubled = ce.grpo_step_s(_args(), grpo, ce.MODEL_7B, 8000, 1)
    assert abs(doubled["update_actor"] / base["update_actor"] - 2) < 1e-9
    assert 1.9 < doubled["gen"] / base["gen"] < 2.0  # validation rollouts do not double
    hours, tokens = ce.sft_hours(_args(), sft, ce.MODEL_7B, 1)
    sft.trainer.total_epochs *= 2
    assert ce.sft_hours(_args(), sft, ce.MODEL_7B, 1)[0] == 2 * hours and tokens == 2000 * 1800 * (sft.trainer.total_epochs // 2)
    # a faster rollout engine shortens only the rollout phase; higher MFU only the training phases
    fast = ce.grpo_step_s(_args(), grpo, ce.MODEL_7B, 16000, 1)
    assert fast["gen"] == doubled["gen"] / 2 and fast["update_actor"] == doubled["update_actor"]


def test_the_script_prints_a_total():
    out = subprocess.run([sys.executable, "-m", "recipe.retool.cloud.cost_estimate", "--usd-per-gpu-hour", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "GPU-hours" in out and "update_actor" in out and "$" in out


def test_more_nodes_scale_generation_fully_and_the_fsdp_passes_at_the_stated_efficiency():
    grpo = OmegaConf.load(ce.CONFIG / "retool_grpo_template.yaml")
    one = ce.grpo_step_s(_args(), grpo, ce.MODEL_7B, 8000, 1)
    two = ce.grpo_step_s(_args(), grpo, ce.MODEL_7B, 8000, 2)
    assert two["gen"] == one["gen"] / 2 and two["overhead"] == one["overhead"]
    assert abs(two["update_actor"] / one["update_actor"] - 1 / (2 * 0.85)) < 1e-12
    perfect = ce.grpo_step_s(_args(cross_node_efficiency=1.0), grpo, ce.MODEL_7B, 8000, 2)
    assert abs(perfect["old_log_prob + ref"] - one["old_log_prob + ref"] / 2) < 1e-9
    out = subprocess.run([sys.executable, "-m", "recipe.retool.cloud.cost_estimate", "--nodes", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "16 GPUs (2 node(s) of 8)" in out and "scaling over nodes of 8 GPUs" in out
