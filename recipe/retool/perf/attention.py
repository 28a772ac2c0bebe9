"""Which attention kernel verl's trainers use: ``retool.attention`` in the configs (default ``auto``).

verl 0.9.1 loads models with ``attn_implementation=flash_attention_2`` unless the model's
``override_config`` says otherwise, and then fails at start-up where the flash-attn package is
missing. ``auto`` picks, on the machine that launches the trainer (the training image):

==========================================  ==================  ==========================================
environment                                 Ulysses SP size     attention
==========================================  ==================  ==========================================
flash-attn 2 installed                      any                 ``flash_attention_2`` (verl's default)
CUDA, no flash-attn, PyTorch >= 2.10        1                   ``retool_packed`` (PyTorch's packed flash
                                                                attention; a pack of one sequence through
                                                                cuDNN's kernel:
                                                                :mod:`recipe.retool.perf.packed_attention`)
no flash-attn (CUDA or not)                 > 1                 refused: verl applies Ulysses only inside
                                                                flash attention (see below)
no CUDA (CPU: development, dry runs)        1                   ``sdpa``
==========================================  ==================  ==========================================

An ``attn_implementation`` set in the model's ``override_config`` (as the miniature's configs do) or a
``retool.attention`` other than ``auto`` is used as given, after the same check.

Why Ulysses needs flash attention: for text models verl 0.9.1 implements Ulysses sequence
parallelism by replacing transformers' ``_flash_attention_forward`` (the all-to-all that gives each
rank all tokens of its heads), while its engine slices every packed row across the ranks for any
attention. With ``sdpa``, ``eager`` or ``retool_packed`` each rank would attend within its own
slice only: training runs, silently wrong.

    python -m recipe.retool.perf.attention [--ulysses N]     # what this machine would pick
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

CHOICES = ("auto", "flash_attention_2", "retool_packed", "sdpa", "eager")
# where each trainer's model config lives, and the Ulysses sizes that apply to it
MODEL_NODE = {"sft": "model", "grpo": "actor_rollout_ref.model"}
ULYSSES_KEYS = {"sft": ("engine.ulysses_sequence_parallel_size",),
                "grpo": ("actor_rollout_ref.actor.ulysses_sequence_parallel_size",
                         "actor_rollout_ref.ref.ulysses_sequence_parallel_size")}
PACKED_LIB = "recipe.retool.perf.packed_attention"
# retool_packed on a Hopper GPU: a pack of one sequence goes to cuDNN's attention kernel unless "0";
# "gqa" hands cuDNN the grouped key/value heads as they are instead of repeated to the query heads
CUDNN_ENV = "RETOOL_PACKED_CUDNN"
_CUDNN_VALUES = {"1": "repeat", "true": "repeat", "on": "repeat", "0": "off", "false": "off", "off": "off", "gqa": "gqa"}


def cudnn_single_sequence_mode() -> str:
    """``RETOOL_PACKED_CUDNN``: how ``retool_packed`` treats a one-sequence pack on Hopper. ``repeat``
    (default, values 1/true/on): cuDNN's kernel with the key/value heads repeated to the query heads;
    ``gqa``: cuDNN's kernel with SDPA's ``enable_gqa`` (no copies); ``off`` (0/false/off): the varlen
    flash kernel like every other pack. The trainer's launch checks it, so that a bad value fails
    before any worker starts."""
    value = os.environ.get(CUDNN_ENV, "1").strip().lower()
    if value not in _CUDNN_VALUES:
        raise ValueError(f"{CUDNN_ENV}={value!r}: expected 1 (cuDNN for one-sequence packs on Hopper, the default), "
                         "gqa (the same with grouped key/value heads passed as they are) or 0")
    return _CUDNN_VALUES[value]


@dataclass(frozen=True)
class Environment:
    """What the training machine offers."""

    flash_attn: bool
    cuda: bool
    varlen: bool  # torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10)

    @classmethod
    def probe(cls) -> Environment:
        import torch
        from transformers.utils import is_flash_attn_2_available

        # flash-attn 2 itself, as transformers checks it: flash-attn-4 installs a `flash_attn`
        # namespace without FA2's kernels
        return cls(flash_attn=is_flash_attn_2_available(), cuda=torch.cuda.is_available(),
                   varlen=importlib.util.find_spec("torch.nn.attention.varlen") is not None)

    def describe(self) -> str:
        return (f"flash-attn {'installed' if self.flash_attn else 'not installed'}, "
                f"{'CUDA' if self.cuda else 'no CUDA'}, "
                f"varlen_attn {'available' if self.varlen else 'missing'}")


@dataclass(frozen=True)
class Choice:
    implementation: str
    reason: str
    problem: str | None = None  # set: training with it would fail or be wrong; the launch is refused


def choose(requested: str, ulysses: int, env: Environment) -> Choice:
    """The attention implementation for ``requested`` (``auto`` or a name) on ``env``."""
    if requested not in CHOICES:
        return Choice(requested, "as configured", f"retool.attention={requested!r}: expected one of {', '.join(CHOICES)}")
    if requested == "auto":
        if env.flash_attn:
            impl, reason = "flash_attention_2", "flash-attn is installed"
        elif ulysses > 1:
            return Choice("flash_attention_2", f"Ulysses sequence parallelism ({ulysses})", _ulysses_problem(ulysses, None))
        elif env.cuda and env.varlen:
            impl, reason = "retool_packed", "CUDA without flash-attn: PyTorch's packed flash attention"
        else:
            impl, reason = "sdpa", f"{env.describe()}"
        return Choice(impl, reason)
    reason = "as configured"
    if requested == "flash_attention_2" and not env.flash_attn:
        return Choice(requested, reason, "attention flash_attention_2 needs the flash-attn package, which is not "
                                         "installed here: install it, or set retool.attention=auto")
    if requested != "flash_attention_2" and ulysses > 1:
        return Choice(requested, reason, _ulysses_problem(ulysses, requested))
    if requested == "retool_packed" and not env.varlen:
        return Choice(requested, reason, "attention retool_packed needs torch.nn.attention.varlen (PyTorch >= 2.10)")
    return Choice(requested, reason)


def _ulysses_problem(ulysses: int, requested: str | None) -> str:
    what = f"attention {requested}" if requested else "no flash-attn package"
    return (f"{what} with Ulysses sequence parallelism {ulysses}: verl 0.9.1 applies Ulysses only inside "
            "flash attention, so every rank would attend within its own slice of the sequence. Install "
            "flash-attn, or set the Ulysses sequence-parallel size to 1")


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)


def resolve(cfg, stage: str, env: Environment | None = None) -> tuple[Choice, list[str]]:
    """The choice for a composed trainer config and the overrides that put it in place."""
    node = MODEL_NODE[stage]
    ulysses = max(int(_select(cfg, k) or 1) for k in ULYSSES_KEYS[stage])
    explicit = _select(cfg, f"{node}.override_config.attn_implementation")
    requested = str(explicit) if explicit else str(_select(cfg, "retool.attention") or "auto")
    env = env or Environment.probe()
    choice = choose(requested, ulysses, env)
    if explicit:
        return choice, []  # already in the config, as given
    return choice, implementation_overrides(node, choice.implementation, new_key=True)


def implementation_overrides(node: str, implementation: str, new_key: bool) -> list[str]:
    """verl overrides that make the model config at ``node`` attend through ``implementation``
    (``new_key``: the config has no ``override_config.attn_implementation`` yet, so Hydra needs ``+``)."""
    overrides = [f"{'+' if new_key else ''}{node}.override_config.attn_implementation={implementation}"]
    if implementation == "retool_packed":
        overrides.append(f"{node}.external_lib={PACKED_LIB}")  # which also loads recipe.retool.perf.verl_perf
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.perf.attention",
                                description="Print the attention implementation `retool.attention=auto` picks on this machine.")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel size (default 1)")
    p.add_argument("--requested", default="auto", choices=CHOICES)
    args = p.parse_args(argv)
    env = Environment.probe()
    choice = choose(args.requested, args.ulysses, env)
    print(f"{env.describe()}; Ulysses {args.ulysses}: {choice.implementation} ({choice.reason})")
    if choice.problem:
        print(f"refused: {choice.problem}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
