"""Fused training kernels for verl's trainers: ``retool.kernels`` in the configs (default ``auto``).

verl 0.9.1 ships two switches, both off by default, that change no maths but much of a step's time
on a GPU:

- ``model.use_fused_kernels`` with ``model.fused_kernel_options.impl_backend=triton``: verl's fused
  linear + log-prob (and entropy) kernel. The log-probabilities come straight from the last hidden
  states and the output embedding, in chunks, so the (tokens × vocabulary) logits are never
  materialised: at 16k tokens and Qwen2.5's 152k vocabulary that is 10 GB in fp32 per sequence.
- ``model.use_liger``: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (the ``liger-kernel``
  package, in the GPU install).

``auto`` turns on what the training machine supports:

=================================================  =============================================
environment                                        kernels
=================================================  =============================================
CUDA, Triton and liger-kernel                      fused log-probs (Triton) + Liger
CUDA and Triton, no liger-kernel                   fused log-probs (Triton)
no CUDA or no Triton (CPU: development, dry runs)  none (verl's defaults)
=================================================  =============================================

The fused log-probs also need ``use_remove_padding=true`` (the recipe's configs set it): in verl
0.9.1 the Triton kernel returns the log-probs flattened, which the engine's padded path indexes as
(batch, length) and fails on (``IndexError`` in ``prepare_model_outputs``). With padding, ``auto``
leaves them off and keeps Liger.

``off`` keeps verl's defaults. A ``use_fused_kernels``, ``use_liger`` or
``fused_kernel_options.impl_backend`` given on the command line wins over ``auto``.

Measured on one H100 (scripts/lab/README.md): 1.5B at 16k tokens, 15,453 → 19,362 tokens/s (MFU
26.2% → 33.1%); 3B at 4k, 12,470 → 15,768 (32.0% → 40.5%); same losses to 1e-4.

    python -m recipe.retool.perf.kernels     # what this machine would turn on
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from recipe.retool.perf.attention import MODEL_NODE, implementation_overrides

CHOICES = ("auto", "off")


@dataclass(frozen=True)
class KernelEnvironment:
    cuda: bool
    triton: bool
    liger: bool

    @classmethod
    def probe(cls) -> KernelEnvironment:
        import torch

        return cls(cuda=torch.cuda.is_available(), triton=importlib.util.find_spec("triton") is not None,
                   liger=importlib.util.find_spec("liger_kernel") is not None)

    def describe(self) -> str:
        return ", ".join([("CUDA" if self.cuda else "no CUDA"), ("Triton" if self.triton else "no Triton"),
                          ("liger-kernel" if self.liger else "no liger-kernel")])


@dataclass(frozen=True)
class KernelChoice:
    settings: dict[str, object]  # model-config keys (relative to the model node) → value
    reason: str
    problem: str | None = None

    def describe(self) -> str:
        names = []
        if self.settings.get("use_fused_kernels"):
            names.append(f"fused log-probs ({self.settings.get('fused_kernel_options.impl_backend')})")
        if self.settings.get("use_liger"):
            names.append("Liger")
        return f"kernels: {' + '.join(names) or 'verl defaults'} ({self.reason})"


def choose(requested: str, env: KernelEnvironment, remove_padding: bool = True) -> KernelChoice:
    if requested not in CHOICES:
        return KernelChoice({}, "as configured", f"retool.kernels={requested!r}: expected one of {', '.join(CHOICES)}")
    if requested == "off":
        return KernelChoice({}, "retool.kernels=off")
    if not (env.cuda and env.triton):
        return KernelChoice({}, env.describe())
    settings: dict[str, object] = {}
    reason = env.describe()
    if remove_padding:
        settings.update({"use_fused_kernels": True, "fused_kernel_options.impl_backend": "triton"})
    else:
        reason += ("; padded batches (use_remove_padding=false): no fused log-probs, whose Triton backend "
                   "fails on padded batches in verl 0.9.1")
    if env.liger:
        settings["use_liger"] = True
    return KernelChoice(settings, reason)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resolve(cfg, stage: str, user_overrides: Iterable[str] = (),
            env: KernelEnvironment | None = None) -> tuple[KernelChoice, list[str]]:
    """The choice for a composed trainer config, and the overrides that put it in place (keys the
    user set on the command line are left as given)."""
    from omegaconf import OmegaConf

    node = MODEL_NODE[stage]
    requested = str(OmegaConf.select(cfg, "retool.kernels", default="auto"))
    remove_padding = _flag(OmegaConf.select(cfg, f"{node}.use_remove_padding", default=True))
    choice = choose(requested, env or KernelEnvironment.probe(), remove_padding)
    given = {_override_key(o) for o in user_overrides}
    overrides = [f"{node}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                 for key, value in choice.settings.items() if f"{node}.{key}" not in given]
    return choice, overrides


def _flag(value) -> bool:
    if isinstance(value, str):  # a quoted YAML value or an interpolation's result
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def padded_triton_problem(cfg, stage: str) -> str | None:
    """The composed config's model asks for verl's Triton log-prob kernel over padded batches (set by
    hand: ``auto`` never does), which fails at the first step in verl 0.9.1: a reason to refuse the launch."""
    from omegaconf import OmegaConf

    node = MODEL_NODE[stage]

    def get(key: str, default):
        return OmegaConf.select(cfg, f"{node}.{key}", default=default)

    if (_flag(get("use_fused_kernels", False)) and not _flag(get("use_remove_padding", True))
            and str(get("fused_kernel_options.impl_backend", "torch")) == "triton"):
        return (f"{node}.use_fused_kernels with impl_backend=triton over padded batches ({node}.use_remove_padding="
                "false): verl 0.9.1's Triton kernel returns flattened log-probs that its padded path cannot index "
                "(IndexError at the first step). Set use_remove_padding=true, impl_backend=torch, or "
                "use_fused_kernels=false")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.perf.kernels",
                                description="Print the fused kernels `retool.kernels=auto` turns on on this machine.")
    p.parse_args(argv)
    env = KernelEnvironment.probe()
    print(choose("auto", env).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# SFT overrides of the two paths compared with padded SDPA step by step (tests/perf/test_packed_attention.py,
# scripts/lab/attention_loss_curves.py): the packed path (one row of concatenated sequences per
# micro-batch, our attention over it) and verl's fused log-prob kernel (no logits tensor built)
PACKED_SFT = ["model.use_remove_padding=true", *implementation_overrides("model", "retool_packed", new_key=False)]


def fused_sft_overrides(device: str) -> list[str]:
    """Triton and Liger on a GPU over packed rows, as ``retool.kernels=auto`` and ``retool.attention=auto``
    set them there; the same maths through verl's torch backend on a CPU."""
    if device == "gpu":
        return [*PACKED_SFT, "model.use_fused_kernels=true", "model.fused_kernel_options.impl_backend=triton",
                "model.use_liger=true"]
    return ["model.use_fused_kernels=true", "model.fused_kernel_options.impl_backend=torch"]
