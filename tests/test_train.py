"""recipe.retool.train: configs compose against verl's real schema; commands; checkpoint resolution."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.retool import CONFIG_DIR, PACKAGE_DIR
from recipe.retool.train import (
    SEARCHPATH,
    CheckpointError,
    compose,
    path_overrides,
    resolve_model,
    split_config_arg,
    unknown_keys,
)

DEV_CONFIG_DIR = PACKAGE_DIR / "dev" / "config"
# by name (recipe/retool/config) or by path (the debug configs, kept with the development scaffolding)
GRPO_CONFIGS = ["retool_grpo_template", "retool_grpo_upstream", str(DEV_CONFIG_DIR / "retool_grpo_debug.yaml"),
                str(DEV_CONFIG_DIR / "retool_grpo_debug_cpu.yaml")]
CONFIGS = ["retool_sft", *GRPO_CONFIGS]


def config_id(name: str) -> str:
    return Path(name).stem


@pytest.mark.parametrize("name", CONFIGS, ids=config_id)
def test_shipped_configs_only_set_keys_verl_knows(name):
    assert unknown_keys(*split_config_arg(name)) == []


def test_a_misspelt_key_is_caught(tmp_path):
    for f in CONFIG_DIR.glob("*.yaml"):
        shutil.copy(f, tmp_path)
    path = tmp_path / "retool_grpo_template.yaml"
    path.write_text(path.read_text().replace("max_prompt_length:", "max_prompt_lenght:"))
    bad = unknown_keys("retool_grpo_upstream", tmp_path)  # found through the variant's parent too
    assert bad == ["retool_grpo_template.yaml: 'data.max_prompt_lenght' is not a key of verl's ppo_trainer config"]


def grpo_cfg(tiny_model_dir, sample_data, name="retool_grpo_template", extra=()):
    data_dir = sample_data["rl"].parent.parent
    config_name, config_dir = split_config_arg(name)
    return compose(config_name, [*path_overrides(str(tiny_model_dir), str(data_dir), "/tmp/out", "t"),
                                 f"retool.recipe_dir={PACKAGE_DIR}", *extra], config_dir)


@pytest.mark.parametrize("name", GRPO_CONFIGS, ids=config_id)
def test_ray_worker_environment_is_literal(tiny_model_dir, sample_data, name):
    """verl 0.9.1 merges ray_kwargs.ray_init.runtime_env outside the config tree: an interpolation
    there reaches Ray as literal "${...}" text (and an oc.env reading it back recurses)."""
    env = OmegaConf.to_container(grpo_cfg(tiny_model_dir, sample_data, name).ray_kwargs.ray_init.runtime_env)
    assert not [k for k, v in env.get("env_vars", {}).items() if "${" in str(v)]


@pytest.mark.parametrize("name", GRPO_CONFIGS, ids=config_id)
def test_grpo_config_passes_verls_own_validation(tiny_model_dir, sample_data, name):
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    cfg = grpo_cfg(tiny_model_dir, sample_data, name)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert need_reference_policy(cfg) == bool(cfg.actor_rollout_ref.actor.use_kl_loss)
    assert not need_critic(cfg)  # GRPO: no critic
    algo = omega_conf_to_dataclass(cfg.algorithm)
    assert isinstance(algo, AlgoConfig) and algo.adv_estimator == "grpo"
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.name == ("hf_dev" if "debug" in config_id(name) else "sglang") and rollout.multi_turn.enable and rollout.multi_turn.format == "hermes"
    assert rollout.agent.default_agent_loop == "tool_agent"
    model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    assert model.path == str(tiny_model_dir) and model.enable_gradient_checkpointing
    assert cfg.data.train_files.endswith("rl/train.parquet") and cfg.data.val_files.endswith("rl/aime24.parquet")


def test_grpo_seed_numbers(tiny_model_dir, sample_data):
    cfg = grpo_cfg(tiny_model_dir, sample_data)
    a, r = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert (cfg.data.train_batch_size, r.n, a.optim.lr) == (256, 16, 1e-6)
    assert (a.use_kl_loss, a.kl_loss_type, a.kl_loss_coef) == (True, "low_var_kl", 0.001)
    assert (r.multi_turn.max_assistant_turns, r.multi_turn.max_user_turns) == (8, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (2048, 4096)
    assert (cfg.trainer.save_freq, cfg.trainer.resume_mode) == (20, "auto")
    assert list(cfg.trainer.logger) == ["console", "swanlab", "file"]


def test_grpo_tool_and_reward_load_through_verls_loaders(tiny_model_dir, sample_data, monkeypatch):
    from verl.tools.tool_registry import initialize_tools_from_config
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from recipe.retool.settings import SANDBOX_URL_ENV

    monkeypatch.delenv(SANDBOX_URL_ENV, raising=False)
    with pytest.raises(ValueError, match=f"set {SANDBOX_URL_ENV}"):  # a tool that cannot reach a sandbox says why
        initialize_tools_from_config(str(CONFIG_DIR / "tool_config" / "retool.yaml"))
    monkeypatch.setenv(SANDBOX_URL_ENV, "http://sandbox.test:1")  # what recipe.retool.train gives verl's processes

    cfg = grpo_cfg(tiny_model_dir, sample_data)
    [tool] = initialize_tools_from_config(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    assert type(tool).__name__ == "SandboxFusionTool" and tool.name == "code_interpreter"
    fn = get_custom_reward_fn(cfg)
    out = fn(data_source="aime24", solution_str="\\boxed{7}", ground_truth="7", extra_info={})
    assert out["score"] == 1.0
    assert fn(data_source="aime24", solution_str="\\boxed{8}", ground_truth="7", extra_info={})["score"] == -1.0


def test_sft_config_converts_like_verls_sft_trainer(tiny_model_dir, sample_data):
    from verl.utils.config import omega_conf_to_dataclass

    data_dir = sample_data["sft"].parent.parent
    cfg = compose("retool_sft", path_overrides(str(tiny_model_dir), str(data_dir), "/tmp/out", "s"))
    engine = omega_conf_to_dataclass(cfg.engine)
    assert engine.strategy == "fsdp2" and engine.ulysses_sequence_parallel_size == 4
    model = omega_conf_to_dataclass(cfg.model)  # imports model.external_lib, as every verl worker does
    assert model.enable_gradient_checkpointing and model.use_remove_padding
    assert model.external_lib == "recipe.retool.perf.verl_perf"
    omega_conf_to_dataclass(cfg.optim)
    omega_conf_to_dataclass(cfg.checkpoint)
    assert (cfg.data.train_batch_size, cfg.data.max_length, cfg.trainer.total_epochs) == (32, 16384, 2)
    assert cfg.trainer.n_gpus_per_node == 8 and cfg.trainer.resume_mode == "auto"
    assert cfg.trainer.default_local_dir == "/tmp/out/sft-experiments/s"


@pytest.mark.parametrize("script, module, config", [
    ("train_retool_grpo.sh", "verl.trainer.main_ppo", "retool_grpo_template"),
    ("train_sft.sh", "verl.trainer.sft_trainer", "retool_sft"),
])
def test_scripts_dry_run_print_the_full_command(script, module, config, tiny_model_dir, sample_data, tmp_path):
    data_dir = sample_data["rl"].parent.parent
    proc = subprocess.run(["bash", str(PACKAGE_DIR / script), str(tiny_model_dir), str(data_dir),
                           str(tmp_path / "out"), "exp1", "trainer.total_epochs=3", "--dry-run"],
                          capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved, command = proc.stdout.split("# command\n")
    assert f"-m {module}" in command and f"--config-name={config}" in command
    assert "trainer.total_epochs=3" in command and "trainer.experiment_name=exp1" in command
    assert shlex.quote(SEARCHPATH) in command  # verl's config tree and ours, for configs kept elsewhere
    cfg = OmegaConf.create(resolved.split("# resolved config\n", 1)[1])
    assert cfg.trainer.total_epochs == 3 and cfg.trainer.experiment_name == "exp1"
    if script == "train_sft.sh":
        # torchrun through the same interpreter, so PATH (here without any venv) does not matter
        assert command.startswith(f"{shlex.quote(sys.executable)} -m torch.distributed.run --nnodes=1 --nproc_per_node=8 --standalone")


def test_dry_run_rejects_unknown_override_and_missing_args(tiny_model_dir, tmp_path):
    proc = subprocess.run(["bash", str(PACKAGE_DIR / "train_retool_grpo.sh"), str(tiny_model_dir), "d", "o",
                           "data.not_a_key=1", "--dry-run"], capture_output=True, text=True,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "not_a_key" in proc.stderr
    proc = subprocess.run(["bash", str(PACKAGE_DIR / "train_retool_grpo.sh"), "only-one"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_resolve_model(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)).path == str(tiny_model_dir)
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").path == "Qwen/Qwen2.5-7B-Instruct"
    root = tmp_path / "sft-experiments" / "e"
    _touch(root / "global_step_5" / "model_world_size_8_rank_0.pt")
    _touch(root / "global_step_40" / "model_world_size_8_rank_0.pt")
    _touch(root / "global_step_40" / "huggingface" / "config.json")  # config only: still sharded
    _touch(root / "global_step_120x" / "junk")
    r = resolve_model(str(root))
    assert r.merge_from == root / "global_step_40" and r.path == str(root / "global_step_40" / "merged_hf")
    assert r.merge_command()[2:4] == ["verl.model_merger", "merge"]
    merged = root / "global_step_40" / "merged_hf"
    _touch(merged / "config.json")
    _touch(merged / "model.safetensors")
    assert resolve_model(str(root)) .path == str(merged) and resolve_model(str(root)).merge_from is None
    grpo = tmp_path / "grpo" / "global_step_20" / "actor"
    _touch(grpo / "model_world_size_2_rank_1.pt")
    assert resolve_model(str(tmp_path / "grpo")).merge_from == grpo
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    _touch(tmp_path / "empty" / "global_step_1" / "notes.txt")
    with pytest.raises(CheckpointError, match="no Hugging Face weights and no FSDP shards"):
        resolve_model(str(tmp_path / "empty"))


def test_configs_kept_elsewhere_extend_ours_and_are_checked(tmp_path):
    """The miniature's configs live in recipe/retool/dev/config and extend retool_sft / the GRPO template."""
    for name in ("mini_sft", "mini_sft_gpu", "mini_grpo", "mini_grpo_gpu"):
        cfg_name, cfg_dir = split_config_arg(str(DEV_CONFIG_DIR / f"{name}.yaml"))
        assert unknown_keys(cfg_name, cfg_dir) == [], name
        cfg = compose(cfg_name, [], cfg_dir)
        assert cfg.trainer.device == ("cuda" if name.endswith("_gpu") else "cpu")
    # a mixin is checked against the base of the config that lists it
    mixin = tmp_path / "mix.yaml"
    mixin.write_text("data:\n  max_lenght: 3\n")
    (tmp_path / "uses_mix.yaml").write_text("defaults:\n  - retool_sft\n  - mix\n  - _self_\n")
    assert unknown_keys("uses_mix", tmp_path) == ["mix.yaml: 'data.max_lenght' is not a key of verl's sft_trainer_engine config"]
    bad = tmp_path / "typo.yaml"
    bad.write_text("defaults:\n  - retool_sft\n  - _self_\ndata:\n  max_lenght: 3\n")
    assert unknown_keys(*split_config_arg(str(bad))) == ["typo.yaml: 'data.max_lenght' is not a key of verl's sft_trainer_engine config"]
    # beneath a field verl types as a free-form dict (FSDP mixed precision) any key is read
    fp32 = tmp_path / "fp32.yaml"
    fp32.write_text("defaults:\n  - retool_grpo_template\n  - _self_\nactor_rollout_ref:\n  actor:\n    fsdp_config:\n"
                    "      mixed_precision:\n        param_dtype: fp32\n      mixed_precison:\n        param_dtype: fp32\n")
    assert unknown_keys(*split_config_arg(str(fp32))) == [
        "fp32.yaml: 'actor_rollout_ref.actor.fsdp_config.mixed_precison.param_dtype' is not a key of verl's ppo_trainer config"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        split_config_arg(str(tmp_path / "missing.yaml"))


def test_no_config_is_more_than_three_of_our_files_deep():
    """A config, what it extends, and what that extends: no deeper (mixins sit beside, not below)."""
    from omegaconf import OmegaConf

    from recipe.retool.train import BASE_CONFIG, find_config

    def depth(name: str, config_dir) -> int:
        raw = OmegaConf.load(find_config(name, config_dir))
        parents = [d for d in raw.get("defaults", []) if isinstance(d, str) and d not in ("_self_", *BASE_CONFIG)]
        return 1 + max((depth(p, config_dir) for p in parents), default=0)

    depths = {p.stem: depth(p.stem, p.parent) for d in (CONFIG_DIR, DEV_CONFIG_DIR) for p in d.glob("*.yaml")}
    assert depths["mini_grpo"] == 3 and depths["retool_grpo_template"] == 1  # the walk sees the chain
    assert max(depths.values()) <= 3, depths


def test_grpo_on_a_running_ray_cluster_hands_its_environment_to_the_job(tiny_model_dir, sample_data, monkeypatch):
    """The workers of a cluster started by `ray start` are not children of the launch: what the
    launch decides for them travels in Ray's job environment, and ray.init gets no resources."""
    from recipe.retool.train import environment, ray_cluster_overrides

    cpu = str(DEV_CONFIG_DIR / "retool_grpo_debug_cpu.yaml")
    cfg = grpo_cfg(tiny_model_dir, sample_data, cpu, ["retool.sandbox_url=http://sb:8080"])
    monkeypatch.setenv("RETOOL_SANDBOX_URL", "http://sb:8080")  # the same value in this process changes nothing
    env = environment(cfg, "grpo")
    assert ray_cluster_overrides(cfg, {**env, "RAY_ADDRESS": "local"}) == []
    got = ray_cluster_overrides(cfg, {**env, "RAY_ADDRESS": "10.0.0.1:6379"})
    assert "ray_kwargs.ray_init.num_cpus=null" in got and "ray_kwargs.ray_init.num_gpus=null" in got
    forwarded = dict(o.removeprefix("++ray_kwargs.ray_init.runtime_env.env_vars.").split("=", 1) for o in got if o.startswith("++"))
    assert forwarded["RETOOL_SANDBOX_URL"] == "'http://sb:8080'"
    assert forwarded["VERL_FILE_LOGGER_PATH"].endswith("metrics.jsonl'")
    assert not any(k in forwarded for k in ("HF_TOKEN", "WANDB_API_KEY", "RAY_AUTH_TOKEN", "HOME"))
    # Hydra reads the overrides back to the same values
    composed = grpo_cfg(tiny_model_dir, sample_data, cpu, ["retool.sandbox_url=http://sb:8080", *got])
    job = composed.ray_kwargs.ray_init
    assert job.num_cpus is None and job.num_gpus is None
    assert job.runtime_env.env_vars["RETOOL_SANDBOX_URL"] == "http://sb:8080"
    assert job.runtime_env.env_vars["VERL_PLATFORM"] == "cpu"  # the config's own entries stay


@pytest.mark.parametrize("value", ["http://sb:8080/x", r"C:\runs\a b", "it's", "ends\\", r"a\'b", "${oc.env:HOME}", "x\\${y}"])
def test_values_handed_to_a_clusters_job_read_back_unchanged(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from recipe.retool.train import _hydra_quote

    (override,) = OverridesParser.create().parse_overrides([f"++a.b={_hydra_quote(value)}"])
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": {"b": override.value()}})
    assert OmegaConf.to_container(cfg, resolve=True)["a"]["b"] == value
