"""The compute dtype of every CPU run: bfloat16 only where the CPU does bfloat16 natively.

On a CPU without native bf16 arithmetic (x86 without AVX512-BF16 or AMX-BF16, e.g. an AVX2-only
EPYC; Arm without the BF16 extension) PyTorch emulates bf16 matrix products: about 16× slower than
fp32 on such a machine (1.2 vs 19 GFLOP/s measured on an AVX2 EPYC). ``ONEDNN_MAX_CPU_ISA`` capped
below bf16 instructions (``AVX2``, ``AVX512_CORE``) does the same on any CPU, and counts as no
native bf16 here (``scripts/lab/bench_cpu_dtype.py`` measures both). A CPU run that asks for bf16
there is slow for no gain, so this module is the one place that decides the dtype a CPU run computes
in; every CPU consumer asks it:

- **verl's trainers** (through :func:`resolve`, called by ``recipe.retool.train`` at launch): verl
  0.9.1's FSDP engine computes in ``mixed_precision.param_dtype``, which is **bf16 when the
  ``mixed_precision`` section is null**, whatever ``engine.dtype`` / ``model_dtype`` say
  (``verl/workers/engine/fsdp/transformer_impl.py``). SFT reads ``engine.mixed_precision``; GRPO the
  actor's and the reference's ``fsdp_config.mixed_precision``, and the rollout engine
  ``actor_rollout_ref.rollout.dtype``.
- **the development engines on CPU** (the ``hf_dev`` rollout server and the OpenAI-compatible model
  server, through :func:`cpu_dtype`).

The rule, for ``trainer.device=cpu`` only (GPU runs are left as configured): a dtype asked for is
kept, except bf16 (or fp16) on a CPU without native bf16, which becomes fp32; the launch says so in
one line (what was asked, what the CPU supports, what runs instead). The miniature's configs ask for
fp32 outright, so that its arithmetic, and therefore its learning, is the same on every CPU.

``RETOOL_CPU_BF16`` overrides what the CPU reports: ``auto`` (default: read the CPU's flags), ``0``
(treat the CPU as having no native bf16: reproduces such a machine's arithmetic anywhere), ``1``
(treat it as native).

    python -m recipe.retool.perf.precision        # what this machine reports, and what a bf16 request gets
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_BF16_ENV = "RETOOL_CPU_BF16"
_ENV_VALUES = {"auto": None, "": None, "1": True, "true": True, "0": False, "false": False}
# the CPU flags (/proc/cpuinfo) that mean native bf16 arithmetic: x86 AVX512-BF16 / AMX-BF16, Arm BF16
NATIVE_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}
LOW_PRECISION = {"bf16", "bfloat16", "fp16", "float16", "16"}
# each trainer's FSDP engine sections (compute dtype: mixed_precision.param_dtype, bf16 when null) and
# the rollout's dtype key
ENGINE_SECTIONS = {"sft": ("engine",),
                   "grpo": ("actor_rollout_ref.actor.fsdp_config", "actor_rollout_ref.ref.fsdp_config")}
ROLLOUT_DTYPE = {"grpo": "actor_rollout_ref.rollout.dtype"}
VERL_DEFAULT_PARAM_DTYPE = "bf16"  # verl 0.9.1, FSDP engine, when mixed_precision is null


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively, and why we say so."""

    native: bool
    reason: str

    @classmethod
    def probe(cls) -> CpuBf16:
        forced = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
        if forced not in _ENV_VALUES:
            raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected auto (read the CPU), 0 (no native bf16) or 1 (native)")
        capability = _torch_capability()
        if _ENV_VALUES[forced] is not None:
            native = bool(_ENV_VALUES[forced])
            return cls(native, f"{CPU_BF16_ENV}={forced}: treated as {'native' if native else 'no native'} bf16"
                               f" (the CPU reports {capability})")
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        if isa and isa not in ("ALL", "DEFAULT") and not any(k in isa for k in ("BF16", "AMX", "AVX10")):
            # oneDNN runs PyTorch's CPU bf16 matrix products; capped below bf16 instructions they are emulated
            return cls(False, f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below bf16 instructions (the CPU reports {capability})")
        machine = platform.machine().lower()
        wanted = NATIVE_FLAGS.get("aarch64" if machine in ("arm64", "aarch64") else machine, ())
        flags = cpu_flags()
        found = [f for f in wanted if f in flags]
        if found:
            return cls(True, f"{capability} with {'/'.join(f.upper() for f in found)}")
        if flags is None:
            return cls(False, f"{capability}; CPU flags unreadable here, bf16 assumed not native")
        return cls(False, f"{capability}, no {' or '.join(f.upper() for f in wanted) or 'known bf16 flag'}")


def _torch_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # no torch (a plan made on a bare machine): the flags alone decide
        return platform.machine() or "unknown CPU"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); None if unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def is_low_precision(dtype: object) -> bool:
    return str(dtype).lower().removeprefix("torch.") in LOW_PRECISION


def cpu_dtype(requested: str, support: CpuBf16 | None = None) -> str:
    """The dtype a CPU computes in when ``requested`` is asked for: fp32 in place of bf16/fp16 unless native."""
    name = str(requested).removeprefix("torch.")
    if not is_low_precision(name):
        return name
    return name if (support or CpuBf16.probe()).native else "float32"


@dataclass(frozen=True)
class PrecisionDecision:
    line: str | None  # what the launch says (None: nothing changed)
    overrides: list[str]


def resolve(cfg, stage: str, support: CpuBf16 | None = None) -> PrecisionDecision:
    """The overrides that make a CPU launch compute in :func:`cpu_dtype`'s dtype (none on GPU)."""
    from omegaconf import OmegaConf

    if str(OmegaConf.select(cfg, "trainer.device", default="cuda")) != "cpu":
        return PrecisionDecision(None, [])
    asked: list[str] = []
    overrides: list[str] = []
    for section in ENGINE_SECTIONS.get(stage, ()):
        mixed = OmegaConf.select(cfg, f"{section}.mixed_precision")
        mixed = dict(OmegaConf.to_container(mixed, resolve=True)) if mixed is not None else {}
        param = mixed.get("param_dtype", VERL_DEFAULT_PARAM_DTYPE)
        if is_low_precision(param):
            support = support or CpuBf16.probe()
            if not support.native:
                asked.append(f"{section}.mixed_precision.param_dtype={param}")
                mixed = {"reduce_dtype": "fp32", "buffer_dtype": "fp32", **mixed, "param_dtype": "fp32"}
                overrides.append(f"++{section}.mixed_precision={{"
                                 + ",".join(f"{k}:{v}" for k, v in mixed.items()) + "}")
    if key := ROLLOUT_DTYPE.get(stage):
        dtype = OmegaConf.select(cfg, key)
        if dtype is not None and is_low_precision(dtype):
            support = support or CpuBf16.probe()
            if not support.native:
                asked.append(f"{key}={dtype}")
                overrides.append(f"{key}=float32")
    if not asked:
        return PrecisionDecision(None, [])
    return PrecisionDecision(f"precision: {', '.join(asked)} asked; this CPU has no native bf16 ({support.reason}): "
                             "computing in fp32 instead", overrides)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.perf.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    try:
        support = CpuBf16.probe()
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print(f"native bf16: {'yes' if support.native else 'no'} ({support.reason})")
    print(f"a CPU run asking for bf16 computes in {cpu_dtype('bfloat16', support)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
