"""retool.kernels: verl's fused log-prob kernel and Liger, turned on where the machine has them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from recipe.retool.perf.attention import Environment
from recipe.retool.perf.kernels import KernelChoice, KernelEnvironment, choose, padded_triton_problem, resolve
from recipe.retool.train import compose, main, path_overrides

FULL = KernelEnvironment(cuda=True, triton=True, liger=True)
NO_LIGER = KernelEnvironment(cuda=True, triton=True, liger=False)
CPU = KernelEnvironment(cuda=False, triton=False, liger=False)
CPU_WITH_PACKAGES = KernelEnvironment(cuda=False, triton=True, liger=True)
FUSED = {"use_fused_kernels": True, "fused_kernel_options.impl_backend": "triton"}


def _cfg(stage: str, *extra: str):
    name = "retool_sft" if stage == "sft" else "retool_grpo_template"
    return compose(name, [*path_overrides("m", "d", "o", None), *extra])


@pytest.mark.parametrize("env, expected", [
    (FULL, {**FUSED, "use_liger": True}),
    (NO_LIGER, FUSED),
    (CPU, {}),
    (CPU_WITH_PACKAGES, {}),  # Triton kernels need a GPU
])
def test_auto_turns_on_what_the_machine_supports(env, expected):
    choice = choose("auto", env)
    assert choice.settings == expected and choice.problem is None


def test_off_and_unknown_values():
    assert choose("off", FULL).settings == {}
    assert "expected one of auto, off" in choose("fast", FULL).problem


@pytest.mark.parametrize("stage, node", [("sft", "model"), ("grpo", "actor_rollout_ref.model")])
def test_overrides_land_in_verls_model_config(stage, node):
    choice, ov = resolve(_cfg(stage), stage, env=FULL)
    assert ov == [f"{node}.use_fused_kernels=true", f"{node}.fused_kernel_options.impl_backend=triton",
                  f"{node}.use_liger=true"]
    model = OmegaConf.select(_cfg(stage, *ov), node)
    assert model.use_fused_kernels is True and model.use_liger is True
    assert model.fused_kernel_options.impl_backend == "triton"
    assert resolve(_cfg(stage, "retool.kernels=off"), stage, env=FULL) == (KernelChoice({}, "retool.kernels=off"), [])


@pytest.mark.parametrize("stage, node", [("sft", "model"), ("grpo", "actor_rollout_ref.model")])
def test_padded_batches_get_liger_but_not_the_fused_log_probs(stage, node):
    """verl 0.9.1's Triton log-prob kernel returns flattened log-probs, which its padded path indexes
    as (batch, length): an IndexError at the first step on a GPU. With use_remove_padding=false, auto
    leaves the fused kernel off, says why, and keeps Liger."""
    choice, ov = resolve(_cfg(stage, f"{node}.use_remove_padding=false"), stage, env=FULL)
    assert ov == [f"{node}.use_liger=true"]
    assert "use_remove_padding=false" in choice.describe() and choice.problem is None
    assert choose("auto", NO_LIGER, remove_padding=False).settings == {}
    assert resolve(_cfg(stage), stage, env=FULL)[1][0] == f"{node}.use_fused_kernels=true"  # the configs' default


def test_triton_log_probs_over_padded_batches_set_by_hand_are_refused(tiny_model_dir, sample_data, tmp_path,
                                                                       monkeypatch, capsys):
    """What auto avoids, asked for on the command line: the launch stops with the reason instead of
    verl failing at the first step on the GPU. The torch backend runs padded batches and is let through."""
    monkeypatch.setattr(KernelEnvironment, "probe", classmethod(lambda cls: FULL))
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls: Environment(flash_attn=True, cuda=True, varlen=True)))
    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    args = ["sft", str(tiny_model_dir), str(sample_data["sft"].parent.parent), str(tmp_path / "o"),
            "model.use_remove_padding=false", "model.use_fused_kernels=true"]
    assert main([*args, "model.fused_kernel_options.impl_backend=triton"]) == 2
    assert not started and "cannot index" in capsys.readouterr().err
    assert main([*args, "model.fused_kernel_options.impl_backend=torch"]) == 0 and len(started) == 1
    assert padded_triton_problem(_cfg("grpo", "actor_rollout_ref.model.use_remove_padding='false'",
                                      "actor_rollout_ref.model.use_fused_kernels=true",
                                      "actor_rollout_ref.model.fused_kernel_options.impl_backend=triton"), "grpo")
    assert padded_triton_problem(_cfg("grpo"), "grpo") is None


def test_a_key_given_on_the_command_line_wins():
    user = ["model.use_liger=false", "+model.fused_kernel_options.impl_backend=torch"]
    _, ov = resolve(_cfg("sft", "model.use_liger=false"), "sft", user, env=FULL)
    assert ov == ["model.use_fused_kernels=true"]


def test_the_launch_carries_them_and_says_so(tiny_model_dir, sample_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(KernelEnvironment, "probe", classmethod(lambda cls: NO_LIGER))
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls: Environment(flash_attn=True, cuda=True, varlen=True)))
    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    data_dir = sample_data["sft"].parent.parent
    assert main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o")]) == 0
    command = " ".join(started[0][0])
    assert "model.use_fused_kernels=true" in command and "model.fused_kernel_options.impl_backend=triton" in command
    assert "use_liger" not in command
    assert "kernels: fused log-probs (triton) (CUDA, Triton, no liger-kernel)" in capsys.readouterr().out
    assert main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o"), "retool.kernels=fastest"]) == 2
    assert len(started) == 1 and "retool.kernels='fastest'" in capsys.readouterr().err


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_cli_and_dry_run_report_this_machine(tiny_model_dir, sample_data, tmp_path):
    expected = choose("auto", KernelEnvironment.probe()).describe()
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.perf.kernels"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == expected
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.train", "grpo", str(tiny_model_dir),
                           str(sample_data["rl"].parent.parent), str(tmp_path / "o"), "--dry-run"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"# {expected}" in proc.stdout.splitlines()[:3]
