"""The recipe's verl plugin: verl loads it in every process through its entry-point group, and each
GRPO step's metrics then carry the reward's time-outs (checked end to end in tests/dev/test_mini_grpo.py)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

from recipe.retool import verl_plugin


def test_the_step_metrics_gain_the_reward_time_outs_and_nothing_else():
    calls = []

    def compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        calls.append(global_steps)
        metrics["critic/score/mean"] = 0.5

    fields = [{"reward_extra_info": {"verify_timed_out": v, "acc": 0.0}} for v in (0.0, 1.0, 1.0, 0.0)]
    wrapped = verl_plugin.wrap(compute_metrics, fetch=lambda batch: [*batch.fields, None])  # a padding row
    metrics = {}
    wrapped(None, SimpleNamespace(fields=fields), metrics, {}, global_steps=3, epoch=0)
    assert metrics == {"critic/score/mean": 0.5, "reward/verify_timeouts": 2.0} and calls == [3]
    other = [{"reward_extra_info": {"acc": 1.0}}]  # another reward function's trajectories
    metrics = {}
    wrapped(None, SimpleNamespace(fields=other), metrics, {}, global_steps=4, epoch=0)
    assert metrics == {"critic/score/mean": 0.5}
    assert verl_plugin.wrap(wrapped) is wrapped  # patched once, however often it is loaded


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
