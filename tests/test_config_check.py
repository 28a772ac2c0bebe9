"""recipe.retool.config_check, through train.py's pre-launch check: override keys, value types against
verl's config dataclasses and defaults, loggers (importable, and running offline without keys), data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipe.retool import PACKAGE_DIR
from recipe.retool.config_check import LOGGER_MODULES
from recipe.retool.train import compose, environment, main, path_overrides, split_config_arg

REPO = Path(__file__).resolve().parents[1]
DEV_CONFIG_DIR = PACKAGE_DIR / "dev" / "config"
SHIPPED = ["retool_sft", "retool_grpo_template", "retool_grpo_upstream",
           *(str(p) for p in sorted(DEV_CONFIG_DIR.glob("*.yaml")))]


@pytest.fixture(scope="module")
def data_dir(sample_data) -> Path:
    return sample_data["rl"].parent.parent


def dry_run(capsys, stage, model, data_dir, *extra) -> tuple[int, str]:
    rc = main([stage, str(model), str(data_dir), "/tmp/retool-out", "exp", *extra, "--dry-run"])
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("stage, override, expected", [
    ("grpo", "actor_rollout_ref.rollout.n=four", "expects an integer (verl.workers.config.rollout.RolloutConfig.n)"),
    ("grpo", "data.train_batch_size=abc", "expects an integer (verl's default is 1024)"),
    ("grpo", "actor_rollout_ref.actor.optim.lr=fast", "expects a number (verl.workers.config.optimizer.FSDPOptimizerConfig.lr)"),
    ("sft", "optim.lr=fast", "expects a number (verl.workers.config.optimizer.FSDPOptimizerConfig.lr)"),
    ("grpo", "trainer.total_epochs=1.5", "expects an integer (verl's default is 30), got 1.5"),
    ("sft", "engine.ulysses_sequence_parallel_size=two", "expects an integer (verl.workers.config.engine.FSDPEngineConfig"),
    ("grpo", "actor_rollout_ref.rollout.multi_turn.enable=maybe", "expects true or false (verl.workers.config.rollout.MultiTurnConfig.enable)"),
])
def test_wrong_typed_overrides_fail_the_dry_run_naming_the_override(capsys, tiny_model_dir, data_dir, stage,
                                                                   override, expected):
    rc, err = dry_run(capsys, stage, tiny_model_dir, data_dir, override)
    assert rc == 2
    [line] = [x for x in err.splitlines() if x.startswith("  ")]  # one problem, one line
    assert line.strip().startswith(f"override '{override}': '{override.split('=')[0]}' {expected}"), err


def test_interpolated_copies_are_not_reported_twice(capsys, tiny_model_dir, data_dir):
    """verl repeats rollout.n as ${...} in actor/ref/critic: the error is reported once, at the override."""
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, "actor_rollout_ref.rollout.n=four")
    assert rc == 2 and len([x for x in err.splitlines() if x.startswith("  ")]) == 1 and "rollout_n" not in err


def test_right_types_in_other_spellings_pass(capsys, tiny_model_dir, data_dir):
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, "actor_rollout_ref.rollout.n=4",
                      "actor_rollout_ref.actor.optim.lr=2e-6", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0",
                      "trainer.total_epochs=2", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                      "reward.custom_reward_function.reward_kwargs.tool_bonus=0", "trainer.logger=[console,wandb]",
                      "trainer.total_training_steps=5", "data.val_batch_size=8", "+retool.env.MY_FLAG=1",
                      "retool.attention=sdpa",
                      # mixed_precision is a free-form dict in verl's FSDP config (null in its YAML)
                      "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32")
    assert rc == 0, err


@pytest.mark.parametrize("override, expected", [
    ("+data.max_prompt_lenght=5", "'data.max_prompt_lenght' is not a key of verl's ppo_trainer config, so verl would "
                                  "never read it; did you mean 'data.max_prompt_length'?"),
    ("+trainer.not_a_setting=1", "'trainer.not_a_setting' is not a key of verl's ppo_trainer config, so verl would never read it"),
    # fsdp_config is a typed dataclass: a misspelt field beneath it is still caught
    ("+actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype=fp32",
     "'actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype' is not a key of verl's ppo_trainer config, "
     "so verl would never read it"),
    ("data.max_prompt_lenght=5", "'data.max_prompt_lenght' is not a key of verl's ppo_trainer config; did you mean "
                                 "'data.max_prompt_length'?"),
])
def test_keys_verl_will_not_read_are_flagged(capsys, tiny_model_dir, data_dir, override, expected):
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, override)
    assert rc == 2 and f"override '{override}': {expected}" in err, err
    assert "To append to your config use +" not in err  # Hydra's hint would lead straight into the + trap


@pytest.mark.parametrize("override, expected", [
    # Hydra's own hint for a misspelt key is "+retool.atention=…", which must not pass either
    ("retool.atention=sdpa", "'retool.atention' is not a key of the recipe's retool block"),
    ("+retool.atention=sdpa", "'retool.atention' is not a key of the recipe's retool block"),
    # our compute_score takes **kwargs (verl passes extra arguments): a misspelt keyword would vanish
    ("+reward.custom_reward_function.reward_kwargs.tool_bonsu=0", "reward keyword 'tool_bonsu' is not a parameter of compute_score"),
    # fields verl's YAML leaves null: their type is not in any default
    ("trainer.total_training_steps=abc", "'trainer.total_training_steps' expects an integer (verl reads it as one"),
    ("data.val_batch_size=1.5", "'data.val_batch_size' expects an integer"),
])
def test_our_own_keys_and_null_defaulted_fields_are_checked_too(capsys, tiny_model_dir, data_dir, override, expected):
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, override)
    assert rc == 2 and f"override '{override}': {expected}" in err, err
    assert "To append to your config use +" not in err
    if "atention" in override:
        assert "did you mean 'retool.attention'?" in err
    if "bonsu" in override:
        assert "did you mean 'tool_bonus'?" in err


def test_a_wrong_type_in_a_yaml_file_names_the_file(capsys, tiny_model_dir, data_dir, tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("defaults:\n  - retool_grpo_template\n  - _self_\nactor_rollout_ref:\n  rollout:\n    n: four\n")
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, "--config", str(cfg))
    assert rc == 2 and "mine.yaml: 'actor_rollout_ref.rollout.n' expects an integer" in err, err


@pytest.mark.parametrize("stage, missing", [("sft", "sft/train.parquet"), ("grpo", "rl/train.parquet")])
def test_missing_data_fails_the_dry_run(capsys, tiny_model_dir, data_dir, tmp_path, stage, missing):
    rc, err = dry_run(capsys, stage, tiny_model_dir, tmp_path / "nowhere")
    assert rc == 2 and f"DATA_DIR '{tmp_path / 'nowhere'}' does not exist" in err, err
    (tmp_path / "partial").mkdir()
    rc, err = dry_run(capsys, stage, tiny_model_dir, tmp_path / "partial")
    assert rc == 2 and f"{tmp_path / 'partial' / missing} does not exist" in err, err


def _composed(name: str, data_dir: Path, tiny_model_dir: Path):
    config_name, config_dir = split_config_arg(name)
    extra = [] if "sft" in config_name else [f"retool.recipe_dir={PACKAGE_DIR}"]
    return compose(config_name, [*path_overrides(str(tiny_model_dir), str(data_dir), "/tmp/o", "e"), *extra], config_dir)


def configured_loggers(data_dir: Path, tiny_model_dir: Path) -> set[str]:
    """Every trainer.logger our recipe, development and cloud configs name."""
    names = set()
    for name in SHIPPED:
        names |= set(_composed(name, data_dir, tiny_model_dir).trainer.logger)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def strings(node):
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            return [s for child in node for s in strings(child)]
        return [node] if isinstance(node, str) else []

    for path in (REPO / "config" / "experiments").glob("*.yaml"):  # the launcher's per-stage verl overrides
        for item in strings(yaml.safe_load(path.read_text())):
            if item.lstrip("+").startswith("trainer.logger="):
                names |= set(OverridesParser.create().parse_overrides([item])[0].value())
    return names


def test_every_configured_logger_imports_and_is_a_requirement(data_dir, tiny_model_dir):
    import importlib

    loggers = configured_loggers(data_dir, tiny_model_dir)
    assert {"console", "swanlab"} <= loggers  # the GRPO template's
    import re

    from recipe.retool.cloud.launcher import read_requirements

    requirements = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in read_requirements()}  # pyproject's dependencies
    for name in loggers | {"wandb"}:  # wandb: the README's documented alternative
        module = LOGGER_MODULES[name]
        if module:
            importlib.import_module(module)
            # installed by every install (pyproject's dependencies) and by the Modal image
            assert module in requirements, f"{module} (trainer.logger {name}) is not in pyproject.toml's dependencies"


def test_loggers_start_without_keys_through_verls_tracking(data_dir, tiny_model_dir, tmp_path):
    """verl's real Tracking with the template's loggers (and wandb), in the environment train.py gives
    the trainer when no API key is set: swanlab logs locally, wandb offline, nothing reaches a network."""
    cfg = _composed("retool_grpo_template", data_dir, tiny_model_dir)
    cfg.trainer.logger = [*cfg.trainer.logger, "wandb"]
    base = {k: v for k, v in os.environ.items() if k not in ("SWANLAB_API_KEY", "WANDB_API_KEY", "SWANLAB_MODE", "WANDB_MODE")}
    env = {k: v for k, v in environment(cfg, "grpo").items() if k in ("SWANLAB_MODE", "WANDB_MODE")}
    assert env == {"SWANLAB_MODE": "local", "WANDB_MODE": "offline"}
    code = ("import sys\nfrom verl.utils.tracking import Tracking\n"
            "t = Tracking('retool', 'e', sys.argv[1].split(','), config={'trainer': {}})\n"
            "t.log({'score': 1.0}, step=1)\nt.finish()\n")
    proc = subprocess.run([sys.executable, "-c", code, ",".join(cfg.trainer.logger)], cwd=tmp_path,
                          env={**base, **env, "WANDB_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any((tmp_path / "swanlog").iterdir()) and any((tmp_path / "wandb").glob("offline-run-*"))


def test_a_logger_that_is_not_installed_fails_before_launch(capsys, tiny_model_dir, data_dir):
    from recipe.retool.config_check import logger_problems

    assert logger_problems(["console", "swanlab", "wandb"], "x.yaml") == []
    LOGGER_MODULES["wandb"] = "retool_no_such_package"
    try:
        [problem] = logger_problems(["console", "wandb"], "x.yaml")
    finally:
        LOGGER_MODULES["wandb"] = "wandb"
    assert problem.startswith("x.yaml: trainer.logger names 'wandb', but the 'retool_no_such_package' package is not installed")
    rc, err = dry_run(capsys, "grpo", tiny_model_dir, data_dir, "trainer.logger=[console,neptune]")
    assert rc == 2 and "override 'trainer.logger=[console,neptune]': trainer.logger names 'neptune', which verl does not know" in err
