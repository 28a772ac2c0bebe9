"""The recipe's verl plugin (entry point group ``verl.plugins``, name ``retool``): the reward's
time-outs as a training metric of every GRPO step.

verl imports the plugins of its ``verl.plugins`` entry-point group in every process that imports
verl (``VERL_USE_EXTERNAL_PLUGINS``, default ``auto``). verl 0.9.1 puts the reward function's extra
information — ours includes ``verify_timed_out`` (a symbolic check that ran past
``reward_kwargs.verify_timeout`` and was judged wrong) — into each training batch, but logs it only
at validation. So when verl's PPO trainer module is imported, this wraps the one function it calls
for each step's data metrics, ``verl.trainer.ppo.ray_trainer.compute_data_metrics``, to add
``reward/verify_timeouts`` (the step's count) beside verl's own metrics. Batches without that
field (another reward function) get nothing added.

A patch of a verl internal, pinned to verl 0.9.1 and listed in docs/verl_patches.md: it goes when
verl logs the reward's extra information during training.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from typing import Any

TARGET = "verl.trainer.ppo.ray_trainer"
FIELD = "verify_timed_out"  # what recipe.retool.reward.compute_score returns per answer
METRIC = "reward/verify_timeouts"


def reward_metrics(batch: Any) -> dict[str, float]:
    """The step's count of reward checks that ran out of time (nothing when the reward gives no such field)."""
    values = getattr(batch, "non_tensor_batch", {}).get(FIELD)
    if values is None:
        return {}
    return {METRIC: float(sum(float(v) for v in values))}


def wrap(compute_data_metrics):
    """verl's ``compute_data_metrics`` with the reward's metrics added."""
    if getattr(compute_data_metrics, "__retool__", False):
        return compute_data_metrics

    @functools.wraps(compute_data_metrics)
    def with_reward_metrics(*args, **kwargs):
        batch = kwargs.get("batch", args[0] if args else None)
        return {**compute_data_metrics(*args, **kwargs), **reward_metrics(batch)}

    with_reward_metrics.__retool__ = True
    return with_reward_metrics


def patch(module) -> None:
    module.compute_data_metrics = wrap(module.compute_data_metrics)


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds verl's trainer module through the other finders and patches it once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: let the real finders find it
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        patch(module)


def install() -> None:
    if TARGET in sys.modules:
        patch(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


install()
