"""The recipe's verl plugin: verl loads it in every process through its entry-point group, and each
GRPO step's data metrics then carry the reward's time-outs."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import numpy as np

from recipe.retool import verl_plugin


def test_the_step_metrics_gain_the_reward_time_outs_and_nothing_else():
    calls = []

    def compute_data_metrics(batch, use_critic=True):
        calls.append(use_critic)
        return {"critic/score/mean": 0.5}

    wrapped = verl_plugin.wrap(compute_data_metrics)
    batch = SimpleNamespace(non_tensor_batch={"verify_timed_out": np.array([0, 1, 1, 0])})
    assert wrapped(batch=batch, use_critic=False) == {"critic/score/mean": 0.5, "reward/verify_timeouts": 2.0}
    assert calls == [False]
    other = SimpleNamespace(non_tensor_batch={"acc": np.array([1.0])})  # another reward function's batch
    assert wrapped(other) == {"critic/score/mean": 0.5}
    assert verl_plugin.wrap(wrapped) is wrapped  # patched once, however often it is loaded


def test_verl_loads_the_plugin_and_its_trainer_computes_step_metrics_through_it():
    assert "recipe.retool.verl_plugin" in {e.value for e in entry_points(group="verl.plugins")}
    code = ("import sys, verl\n"
            "assert 'recipe.retool.verl_plugin' in sys.modules, 'verl did not load the plugin'\n"
            "import verl.trainer.ppo.ray_trainer as rt\n"
            "from verl.trainer.ppo import metric_utils\n"
            "assert rt.compute_data_metrics.__wrapped__ is metric_utils.compute_data_metrics\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    off = subprocess.run([sys.executable, "-c", "import sys, verl; print('recipe.retool.verl_plugin' in sys.modules)"],
                         capture_output=True, text=True, timeout=300, env={"VERL_USE_EXTERNAL_PLUGINS": "none",
                                                                            "PATH": "/usr/bin:/bin"})
    assert off.stdout.strip() == "False", off.stderr[-2000:]  # verl's switch turns it off
