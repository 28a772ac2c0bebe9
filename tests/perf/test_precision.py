"""recipe.retool.perf.precision: every CPU run computes in fp32 unless the CPU does bf16 natively."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.retool import PACKAGE_DIR
from recipe.retool.perf.precision import (
    CPU_BF16_ENV,
    ENGINE_SECTIONS,
    CpuBf16,
    cpu_dtype,
    cpu_flags,
    resolve,
)
from recipe.retool.train import compose, path_overrides

DEV = PACKAGE_DIR / "dev" / "config"
REPO = Path(__file__).resolve().parents[2]
NO_BF16 = CpuBf16(False, "AVX2, no AVX512_BF16 or AMX_BF16")
BF16 = CpuBf16(True, "AVX512 with AVX512_BF16")
# every CPU config the miniature launches, as it launches them (stage, config, extra overrides)
MINIATURE_CPU_RUNS = [
    ("sft", "mini_sft", []),
    ("grpo", "mini_grpo", []),
    ("grpo", "mini_grpo", ["actor_rollout_ref.rollout.multi_turn.max_assistant_turns=1"]),  # text-only ablation
]


def compute_dtype(engine) -> str:
    """The dtype verl 0.9.1's FSDP engine computes in: mixed_precision.param_dtype, bf16 when null
    (checked against verl's source by test_verl_still_computes_in_bf16_when_mixed_precision_is_null)."""
    from verl.utils.torch_dtypes import PrecisionType

    mixed = engine.get("mixed_precision")
    return PrecisionType.to_str(PrecisionType.to_dtype(mixed.get("param_dtype", "bf16") if mixed else "bf16"))


def launched(stage: str, name: str, extra: list[str], support: CpuBf16, config_dir: Path = DEV):
    """The config as ``recipe.retool.train`` launches it: composed, then the precision decision applied."""
    base = [*path_overrides("/m", "/d", "/o", "x"), *extra]
    cfg = compose(name, base, config_dir)
    decision = resolve(cfg, stage, support)
    return compose(name, [*base, *decision.overrides], config_dir), decision


def trainer_dtypes(stage: str, cfg) -> dict[str, str]:
    out = {section: compute_dtype(OmegaConf.select(cfg, section)) for section in ENGINE_SECTIONS[stage]}
    if stage == "grpo":
        out["rollout"] = cpu_dtype(cfg.actor_rollout_ref.rollout.dtype, NO_BF16)
    return out


def test_verl_still_computes_in_bf16_when_mixed_precision_is_null():
    """The rule compute_dtype mirrors, read from the pinned verl's engine (fails if a release changes it)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    src = inspect.getsource(FSDPEngine)
    assert 'mixed_precision_config.get("param_dtype", "bf16")' in src
    assert "else:\n            param_dtype = torch.bfloat16" in src


@pytest.mark.parametrize("support", [NO_BF16, BF16], ids=["no-native-bf16", "native-bf16"])
@pytest.mark.parametrize("stage,name,extra", MINIATURE_CPU_RUNS, ids=["sft", "grpo", "grpo-text-only"])
def test_every_cpu_config_of_the_miniature_computes_in_fp32(stage, name, extra, support):
    cfg, _ = launched(stage, name, extra, support)
    assert cfg.trainer.device == "cpu"
    dtypes = trainer_dtypes(stage, cfg)
    assert all(d in ("fp32", "float32") for d in dtypes.values()), dtypes


# verl's defaults on a CPU run: bf16 compute (the CPU configs ask fp32; these overrides ask bf16 again)
ASK_BF16 = ["actor_rollout_ref.actor.fsdp_config.mixed_precision=null",
            "actor_rollout_ref.ref.fsdp_config.mixed_precision=null", "actor_rollout_ref.rollout.dtype=bfloat16"]


def test_a_bf16_config_on_a_cpu_without_native_bf16_computes_in_fp32_and_says_so():
    cfg, decision = launched("grpo", "retool_grpo_debug_cpu", ASK_BF16, NO_BF16)
    assert set(trainer_dtypes("grpo", cfg).values()) == {"fp32", "float32"}
    assert decision.line.count("\n") == 0
    for part in ("actor.fsdp_config.mixed_precision.param_dtype=bf16", "rollout.dtype=bfloat16", NO_BF16.reason,
                 "fp32 instead"):
        assert part in decision.line
    # the same config where bf16 is native: left as asked, nothing said
    cfg, decision = launched("grpo", "retool_grpo_debug_cpu", ASK_BF16, BF16)
    assert compute_dtype(cfg.actor_rollout_ref.actor.fsdp_config) == "bf16" and decision.line is None
    # and on a GPU nothing is decided here
    cfg = compose("retool_grpo_template", path_overrides("/m", "/d", "/o", "x"))
    assert resolve(cfg, "grpo", NO_BF16).overrides == []


def test_an_explicit_mixed_precision_keeps_its_other_dtypes():
    asked = [*path_overrides("/m", "/d", "/o", "x"), "engine.mixed_precision={param_dtype:bf16,reduce_dtype:bf16}"]
    decision = resolve(compose("mini_sft", asked, DEV), "sft", NO_BF16)
    mixed = compose("mini_sft", [*asked, *decision.overrides], DEV).engine.mixed_precision
    assert OmegaConf.to_container(mixed) == {"param_dtype": "fp32", "reduce_dtype": "bf16", "buffer_dtype": "fp32"}


def test_the_cpu_flags_decide(tmp_path, monkeypatch):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert cpu_flags(x86) == {"fpu", "sse2", "avx2", "fma"} and "bf16" in cpu_flags(arm)
    assert cpu_flags(tmp_path / "missing") is None
    import recipe.retool.perf.precision as precision

    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "cpu_flags", lambda: cpu_flags(x86))
    avx2 = CpuBf16.probe()
    assert not avx2.native and "AVX512_BF16" in avx2.reason
    assert cpu_dtype("bfloat16", avx2) == "float32" and cpu_dtype("float32", avx2) == "float32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert CpuBf16.probe().native and cpu_dtype("bfloat16", CpuBf16.probe()) == "bfloat16"
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "cpu_flags", lambda: cpu_flags(arm))
    assert CpuBf16.probe().native
    # oneDNN capped below bf16 instructions emulates bf16 on any CPU: not native
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not CpuBf16.probe().native and "ONEDNN_MAX_CPU_ISA=AVX2" in CpuBf16.probe().reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert CpuBf16.probe().native
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    # the override reproduces a CPU without native bf16 anywhere, and a bad value is refused
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not CpuBf16.probe().native
    monkeypatch.setenv(CPU_BF16_ENV, "maybe")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        CpuBf16.probe()


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_the_launch_says_it_in_one_line_and_runs_fp32(tiny_model_dir, sample_data):
    data_dir = sample_data["rl"].parent.parent
    cmd = [sys.executable, "-m", "recipe.retool.train", "grpo", str(tiny_model_dir), str(data_dir), "/tmp/o", "x",
           "--config", str(DEV / "retool_grpo_debug_cpu.yaml"), *ASK_BF16, "--dry-run"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), CPU_BF16_ENV: "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("# precision:")]
    assert len(lines) == 1 and "no native bf16" in lines[0], out[:2000]
    assert "param_dtype: fp32" in out and "mixed_precision={" in out.split("# command")[1]
    env[CPU_BF16_ENV] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=True).stdout
    assert "# precision:" not in out
    env[CPU_BF16_ENV] = "sometimes"
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode == 2 and CPU_BF16_ENV in bad.stderr
