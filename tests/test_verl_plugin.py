"""The recipe's verl plugin: verl loads it in every process through its entry-point group, and each
GRPO step's metrics then carry the reward's time-outs and the consistency metrics (checked end to end
in tests/dev/test_mini_grpo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

from recipe.retool import verl_plugin


def trainer(tmp_path=None, **consistency):
    """What the wrapper reads of verl's trainer: its config, and where its file logger writes."""
    from omegaconf import OmegaConf

    config = OmegaConf.create({"retool": {"consistency": consistency}} if consistency else {})
    file_logger = SimpleNamespace(filepath=str(tmp_path / "metrics.jsonl")) if tmp_path else None
    return SimpleNamespace(config=config, logger=SimpleNamespace(logger={"file": file_logger} if file_logger else {}))


def test_the_step_metrics_gain_the_reward_time_outs_and_nothing_else():
    calls = []

    def compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        calls.append(global_steps)
        metrics["critic/score/mean"] = 0.5

    fields = [{"reward_extra_info": {"verify_timed_out": v, "acc": 0.0}} for v in (0.0, 1.0, 1.0, 0.0)]
    wrapped = verl_plugin.wrap(compute_metrics, fetch=lambda self, batch: verl_plugin.StepData(extra_fields=batch.fields))
    metrics = {}
    wrapped(trainer(), SimpleNamespace(fields=fields), metrics, {}, global_steps=3, epoch=0)
    assert metrics == {"critic/score/mean": 0.5, "reward/verify_timeouts": 2.0} and calls == [3]
    other = [{"reward_extra_info": {"acc": 1.0}}]  # another reward function's trajectories
    metrics = {}
    wrapped(trainer(), SimpleNamespace(fields=other), metrics, {}, global_steps=4, epoch=0)
    assert metrics == {"critic/score/mean": 0.5}
    assert verl_plugin.wrap(wrapped) is wrapped  # patched once, however often it is loaded


def test_the_step_metrics_gain_the_consistency_metrics_and_the_first_drift_is_written(tmp_path, capsys):
    record = {"assistant_turns": 2, "invalid_turns": 1, "tool_calls": 1, "cut": "", "drift_checked": True, "drift": None}
    drift = {"position": 40, "where": "context", "rollout": "<|im_end|>⟦<|im_start|>", "template": "<|im_end|>⟦\n<|im_start|>",
             "retokenized": False}
    fields = [{"retool_consistency": record}, {"retool_consistency": {**record, "drift": drift}}]
    step = verl_plugin.StepData(extra_fields=fields, rollout_log_probs=torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]),
                                old_log_probs=torch.tensor([[-1.0, -2.5], [-0.5, -3.0]]),
                                response_mask=torch.tensor([[1, 1], [1, 0]]))
    wrapped = verl_plugin.wrap(lambda self, batch, metrics, *a, **k: None, fetch=lambda self, batch: step)
    metrics = {}
    wrapped(trainer(tmp_path, logprob_tol=0.1), None, metrics, {}, global_steps=7, epoch=0)
    assert metrics["consistency/logprob_diff/max"] == 0.5  # the tool token (mask 0) is left out
    assert metrics["consistency/logprob_diff/share_above_tol"] == pytest.approx(1 / 3)
    assert metrics["consistency/tool_calls/invalid_turn_share"] == 0.5
    assert (metrics["consistency/token_drift/checked"], metrics["consistency/token_drift/mismatched"]) == (2.0, 1.0)
    assert metrics["consistency/token_drift/first_position"] == 40.0
    assert [json.loads(x) for x in (tmp_path / "token_drift.jsonl").read_text().splitlines()] == [{"step": 7, **drift}]
    assert "step 7: token drift at position 40 (context)" in capsys.readouterr().out


def test_verl_padding_rows_are_left_out(monkeypatch):
    """verl pads a step's batch with copies of its first trajectory (``is_padding`` in the tag)."""
    fetched = []

    class Fields(dict):
        def to_padded_tensor(self):
            return self

    def kv_batch_get(keys, partition_id, select_fields):
        fetched.append((list(keys), select_fields))
        if select_fields == ["extra_fields"]:
            return Fields(extra_fields=SimpleNamespace(tolist=lambda: [{"row": k} for k in keys]))
        return Fields({f: torch.zeros(len(keys), 3) for f in select_fields})

    monkeypatch.setitem(sys.modules, "transfer_queue", SimpleNamespace(kv_batch_get=kv_batch_get))
    batch = SimpleNamespace(keys=["a", "b", "pad"], partition_id="train",
                            tags=[{}, {"is_padding": False}, {"is_padding": True}])
    config = SimpleNamespace(actor_rollout_ref=SimpleNamespace(rollout=SimpleNamespace(calculate_log_probs=True)))
    step = verl_plugin._fetch_step(SimpleNamespace(config=config), batch)
    assert step.extra_fields == [{"row": "a"}, {"row": "b"}] and step.rollout_log_probs.shape == (2, 3)
    assert [k for k, _ in fetched] == [["a", "b"], ["a", "b"]]
    assert fetched[1][1] == ["rollout_log_probs", "old_log_probs", "response_mask"]


def test_verl_loads_the_plugin_and_its_trainer_computes_step_metrics_through_it():
    assert "recipe.retool.verl_plugin" in {e.value for e in entry_points(group="verl.plugins")}
    code = ("import sys, verl\n"
            "assert 'recipe.retool.verl_plugin' in sys.modules, 'verl did not load the plugin'\n"
            "from verl.trainer.ppo.v1 import trainer_base\n"
            "assert trainer_base.PPOTrainer._compute_metrics.__retool__\n"
            "assert trainer_base.PPOTrainer._compute_metrics.__wrapped__.__qualname__ == 'PPOTrainer._compute_metrics'\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", "import sys, verl; print('recipe.retool.verl_plugin' in sys.modules)"],
                         capture_output=True, text=True, timeout=300, env={"VERL_USE_EXTERNAL_PLUGINS": "none",
                                                                            "PATH": "/usr/bin:/bin"})
    assert off.stdout.strip() == "False", off.stderr[-2000:]  # verl's switch turns it off


def test_no_log_prob_gap_is_reported_where_verl_takes_the_rollouts_as_its_own():
    """verl's bypass mode sets old_log_probs to the rollout's: a gap of 0 that would prove nothing."""
    from omegaconf import OmegaConf

    step = verl_plugin.StepData(extra_fields=[], rollout_log_probs=torch.tensor([[-1.0]]),
                                old_log_probs=torch.tensor([[-1.5]]), response_mask=torch.tensor([[1]]))
    plain = OmegaConf.create({"retool": {"consistency": {"logprob_tol": 0.1}}})
    bypass = OmegaConf.merge(plain, {"algorithm": {"rollout_correction": {"bypass_mode": True}}})
    assert verl_plugin.step_metrics(step, plain)[0]["consistency/logprob_diff/max"] == 0.5
    assert not any(k.startswith("consistency/logprob_diff") for k in verl_plugin.step_metrics(step, bypass)[0])
