"""The recipe's verl plugin (entry point group ``verl.plugins``, name ``retool``): the reward's
time-outs as a training metric of every GRPO step.

verl imports the plugins of its ``verl.plugins`` entry-point group in every process that imports
verl (``VERL_USE_EXTERNAL_PLUGINS``, default ``auto``). verl 0.9.1's trainer (the v1 trainer our
GRPO configs use) keeps the reward function's extra information — ours includes
``verify_timed_out``, a symbolic check that ran past ``reward_kwargs.verify_timeout`` and was judged
wrong — with each trajectory, but reads it only at validation. So when verl's trainer module is
imported, this wraps the one method that computes each step's metrics,
``verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_metrics``, to add ``reward/verify_timeouts``
(the step's count) beside verl's own metrics. Steps whose reward gives no such field get nothing added.

A patch of a verl internal, pinned to verl 0.9.1 and listed in docs/verl_patches.md: it goes when
verl logs the reward's extra information during training.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Iterable
from typing import Any

TARGET = "verl.trainer.ppo.v1.trainer_base"
FIELD = "verify_timed_out"  # what recipe.retool.reward.compute_score returns per answer
METRIC = "reward/verify_timeouts"


def reward_metrics(extra_fields: Iterable[Any]) -> dict[str, float]:
    """A step's count of reward checks that ran out of time, from its trajectories' ``extra_fields``
    (``{"reward_extra_info": {...}}`` each); nothing when the reward gives no such field."""
    values = [field.get("reward_extra_info", {}).get(FIELD) for field in extra_fields if isinstance(field, dict)]
    values = [float(v) for v in values if v is not None]
    return {METRIC: sum(values)} if values else {}


def _fetch_extra_fields(batch: Any) -> list[Any]:
    import transfer_queue as tq  # verl 0.9.1's trajectory store (what the trainer reads its fields from)

    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
    return data.pop("extra_fields").tolist()


def wrap(compute_metrics, fetch=_fetch_extra_fields):
    """verl's ``_compute_metrics(self, batch, metrics, ...)`` with the reward's metrics added to ``metrics``."""
    if getattr(compute_metrics, "__retool__", False):
        return compute_metrics

    @functools.wraps(compute_metrics)
    def with_reward_metrics(self, batch, metrics, *args, **kwargs):
        out = compute_metrics(self, batch, metrics, *args, **kwargs)
        metrics.update(reward_metrics(fetch(batch)))
        return out

    with_reward_metrics.__retool__ = True
    return with_reward_metrics


def patch(module) -> None:
    module.PPOTrainer._compute_metrics = wrap(module.PPOTrainer._compute_metrics)


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
