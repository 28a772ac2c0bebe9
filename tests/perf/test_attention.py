"""retool.attention: which attention kernel each environment gets, and the launches refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from recipe.retool import PACKAGE_DIR
from recipe.retool.perf.attention import Environment, choose, resolve
from recipe.retool.train import compose, main, path_overrides, split_config_arg

FLASH = Environment(flash_attn=True, cuda=True, varlen=True)
CUDA_ONLY = Environment(flash_attn=False, cuda=True, varlen=True)
OLD_TORCH = Environment(flash_attn=False, cuda=True, varlen=False)
CPU = Environment(flash_attn=False, cuda=False, varlen=True)


@pytest.mark.parametrize("env, ulysses, expected", [
    (FLASH, 1, "flash_attention_2"),
    (FLASH, 4, "flash_attention_2"),
    (CUDA_ONLY, 1, "retool_packed"),
    (OLD_TORCH, 1, "sdpa"),
    (CPU, 1, "sdpa"),
])
def test_auto_picks_the_fastest_path_the_environment_has(env, ulysses, expected):
    choice = choose("auto", ulysses, env)
    assert choice.implementation == expected and choice.problem is None, choice


@pytest.mark.parametrize("env", [CUDA_ONLY, CPU])
def test_ulysses_without_flash_attn_is_refused_not_silently_wrong(env):
    # verl 0.9.1 does Ulysses' all-to-all inside flash attention only: any other kernel would attend
    # within each rank's slice of the sequence
    assert "Ulysses" in choose("auto", 4, env).problem
    for name in ("sdpa", "eager", "retool_packed"):
        assert "Ulysses" in choose(name, 2, FLASH).problem


def test_a_named_kernel_the_machine_lacks_is_refused():
    assert "flash-attn" in choose("flash_attention_2", 1, CUDA_ONLY).problem
    assert "varlen" in choose("retool_packed", 1, OLD_TORCH).problem
    assert "expected one of" in choose("flash", 1, FLASH).problem
    assert choose("sdpa", 1, CPU).problem is None


def _cfg(stage, *overrides):
    name = {"sft": "retool_sft", "grpo": "retool_grpo_template"}[stage]
    return compose(name, [*path_overrides("m", "d", "o", None), *overrides])


def test_overrides_put_the_choice_into_verls_model_config():
    choice, ov = resolve(_cfg("grpo"), "grpo", CUDA_ONLY)
    assert choice.implementation == "retool_packed"
    assert ov == ["+actor_rollout_ref.model.override_config.attn_implementation=retool_packed",
                  "actor_rollout_ref.model.external_lib=recipe.retool.perf.packed_attention"]
    cfg = compose("retool_grpo_template", [*path_overrides("m", "d", "o", None), *ov])
    assert cfg.actor_rollout_ref.model.override_config.attn_implementation == "retool_packed"
    # the SFT template runs Ulysses 4: flash attention when installed, else refused
    choice, ov = resolve(_cfg("sft"), "sft", FLASH)
    assert ov == ["+model.override_config.attn_implementation=flash_attention_2"]
    assert resolve(_cfg("sft"), "sft", CUDA_ONLY)[0].problem
    # the reference model's own Ulysses size counts too
    assert resolve(_cfg("grpo", "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2"), "grpo", CUDA_ONLY)[0].problem
    # an implementation already in the config (the miniature's sdpa) is kept and still checked
    name, config_dir = split_config_arg(str(PACKAGE_DIR / "dev" / "config" / "mini_sft.yaml"))
    cfg = compose(name, path_overrides("m", "d", "o", None), config_dir)
    assert resolve(cfg, "sft", CUDA_ONLY) == (choose("sdpa", 1, CUDA_ONLY), [])


def test_a_launch_that_would_train_wrongly_is_refused_before_anything_starts(tiny_model_dir, sample_data, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls: CUDA_ONLY))
    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    data_dir = sample_data["sft"].parent.parent
    rc = main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o")])
    assert rc == 2 and not started
    assert "Ulysses sequence parallelism 4" in capsys.readouterr().err
    rc = main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o"), "engine.ulysses_sequence_parallel_size=1"])
    assert rc == 0 and len(started) == 1
    command = " ".join(started[0][0])
    assert "+model.override_config.attn_implementation=retool_packed" in command
    assert "model.external_lib=recipe.retool.perf.packed_attention" in command


def test_dry_run_says_what_it_picked(tiny_model_dir, sample_data, tmp_path):
    data_dir = sample_data["rl"].parent.parent
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.train", "grpo", str(tiny_model_dir), str(data_dir),
                           str(tmp_path / "o"), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    env = Environment.probe()
    expected = choose("auto", 1, env).implementation
    assert first.startswith(f"# attention: {expected} (")
    resolved = OmegaConf.create(proc.stdout.split("# resolved config\n", 1)[1].split("# command\n")[0])
    assert resolved.actor_rollout_ref.model.override_config.attn_implementation == expected


def test_cli_reports_this_machine():
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.perf.attention", "--ulysses", "1"], capture_output=True, text=True)
    assert proc.returncode == 0 and Environment.probe().describe() in proc.stdout
