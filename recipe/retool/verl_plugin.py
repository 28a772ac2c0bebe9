"""The recipe's verl plugin (entry point group ``verl.plugins``, name ``retool``): the recipe's own
metrics in every GRPO step — the reward's time-outs, and the consistency of rollout and trainer.

verl imports the plugins of its ``verl.plugins`` entry-point group in every process that imports
verl (``VERL_USE_EXTERNAL_PLUGINS``, default ``auto``). When verl's trainer module is imported, this
wraps the one method that computes each step's metrics,
``verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_metrics`` (the v1 trainer our GRPO configs
use), to add beside verl's own metrics, from the step's trajectories (padding rows left out):

- ``reward/verify_timeouts``: the count of symbolic checks that ran past
  ``reward_kwargs.verify_timeout`` (judged wrong). verl 0.9.1 keeps the reward function's extra
  information with each trajectory but reads it only at validation; steps whose reward gives no such
  field get nothing added;
- ``consistency/…`` (:mod:`recipe.retool.consistency`): the rollout's log-probabilities against the
  trainer's on the same tokens (verl's ``rollout_log_probs`` and ``old_log_probs``, present when
  ``rollout.calculate_log_probs`` is on), and the token drift and tool-call health the recipe's agent
  loop records per trajectory. A step's first token drift also goes, with its decoded context, to the
  trainer's log and to ``token_drift.jsonl`` beside verl's metrics file.

A patch of a verl internal, pinned to verl 0.9.1 and listed in docs/verl_patches.md: it goes when
verl's trainer offers a hook for a recipe's step metrics.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TARGET = "verl.trainer.ppo.v1.trainer_base"
FIELD = "verify_timed_out"  # what recipe.retool.reward.compute_score returns per answer
METRIC = "reward/verify_timeouts"


def reward_metrics(extra_fields: Iterable[Any]) -> dict[str, float]:
    """A step's count of reward checks that ran out of time, from its trajectories' ``extra_fields``
    (``{"reward_extra_info": {...}}`` each); nothing when the reward gives no such field."""
    values = [f.get("reward_extra_info", {}).get(FIELD) for f in extra_fields if isinstance(f, dict)]
    values = [float(v) for v in values if v is not None]
    return {METRIC: sum(values)} if values else {}


@dataclass
class StepData:
    """What the metrics read of a step's trajectories (real ones: verl's padding rows left out)."""

    extra_fields: list = field(default_factory=list)
    rollout_log_probs: Any = None  # rows × response tokens; None when the rollout returns none
    old_log_probs: Any = None
    response_mask: Any = None


def step_metrics(step: StepData, config) -> tuple[dict[str, float], dict | None]:
    """The recipe's metrics of one step, and its first token drift (or None)."""
    from omegaconf import OmegaConf

    from recipe.retool import consistency

    metrics = reward_metrics(step.extra_fields)
    # in verl's bypass mode the trainer takes the rollout's log-probs as its own: a gap of 0 by
    # construction, so none is reported
    bypass = OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode", default=False)
    if step.rollout_log_probs is not None and step.old_log_probs is not None and not bypass:
        tol = OmegaConf.select(config, "retool.consistency.logprob_tol", default=None)
        metrics.update(consistency.logprob_gap(step.rollout_log_probs, step.old_log_probs, step.response_mask,
                                               None if tol is None else float(tol)))
    records = consistency.records_of(step.extra_fields)
    metrics.update(consistency.tool_health(records))
    drift_metrics, drift = consistency.drift_metrics(records)
    metrics.update(drift_metrics)
    return metrics, drift


def _fetch_step(trainer, batch) -> StepData:
    import transfer_queue as tq  # verl 0.9.1's trajectory store (what the trainer reads its fields from)

    keys = [k for k, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
    if not keys:
        return StepData()
    extra = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
    step = StepData(extra_fields=extra.pop("extra_fields").tolist())
    if trainer.config.actor_rollout_ref.rollout.calculate_log_probs:
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                               select_fields=["rollout_log_probs", "old_log_probs", "response_mask"]).to_padded_tensor()
        step.rollout_log_probs, step.old_log_probs = data["rollout_log_probs"], data["old_log_probs"]
        step.response_mask = data["response_mask"]
    return step


def _drift_file(trainer) -> Path | None:
    """Beside verl's ``file`` logger output (verl 0.9.1: ``Tracking.logger["file"].filepath``), if it logs there."""
    from recipe.retool.consistency import DRIFT_FILE

    file_logger = getattr(getattr(trainer, "logger", None), "logger", {}).get("file")
    path = getattr(file_logger, "filepath", None)
    return Path(path).with_name(DRIFT_FILE) if path else None


def report_drift(trainer, drift: dict, step: int | None) -> None:
    """A step's first token drift, to the trainer's log and to ``token_drift.jsonl``."""
    print(f"[retool consistency] step {step}: token drift at position {drift['position']} ({drift['where']}): "
          f"rollout {drift['rollout']!r} / template {drift['template']!r}", flush=True)
    path = _drift_file(trainer)
    if path is not None:
        with path.open("a") as fh:
            fh.write(json.dumps({"step": step, **drift}) + "\n")


def wrap(compute_metrics, fetch=_fetch_step, report=report_drift):
    """verl's ``_compute_metrics(self, batch, metrics, ...)`` with the recipe's metrics added to ``metrics``."""
    if getattr(compute_metrics, "__retool__", False):
        return compute_metrics

    @functools.wraps(compute_metrics)
    def with_recipe_metrics(self, batch, metrics, *args, **kwargs):
        out = compute_metrics(self, batch, metrics, *args, **kwargs)
        recipe_metrics, drift = step_metrics(fetch(self, batch), self.config)
        metrics.update(recipe_metrics)
        if drift is not None:
            report(self, drift, kwargs.get("global_steps"))
        return out

    with_recipe_metrics.__retool__ = True
    return with_recipe_metrics


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
