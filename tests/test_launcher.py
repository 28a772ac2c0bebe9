"""recipe.retool.launcher: experiment configs, volume names, commands, checkpoints, secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from recipe.retool import launcher
from recipe.retool.launcher import ConfigError, Experiment, load_experiment, volume_names

REPO = launcher.REPO_ROOT


def test_file_then_overrides_then_environment(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("experiment: e1\ngpus: 4\nsft:\n  overrides: [trainer.total_epochs=1]\n")
    exp = load_experiment(cfg, ["gpus=2", "grpo.config=retool_grpo_upstream"], environ={"RETOOL_EXPERIMENTER": "ana"})
    assert (exp.experiment, exp.gpus, exp.experimenter) == ("e1", 2, "ana")
    assert exp.sft["overrides"] == ["trainer.total_epochs=1"] and exp.sft["config"] == "retool_sft"  # merged, not replaced
    assert exp.grpo["config"] == "retool_grpo_upstream" and exp.model == Experiment().model


@pytest.mark.parametrize("text, override, message", [
    ("gpus: 4\ngpu_typo: A100\n", [], "unknown key 'gpu_typo'"),
    ("sft:\n  overide: []\n", [], r"exp.yaml.sft: unknown key 'overide'"),
    ("", ["nodes"], "expected key=value"),
    ("", ["gpus=0"], "gpus and nodes must be ≥ 1"),
    ("- a list\n", [], "expected a mapping"),
])
def test_bad_configs_are_named(tmp_path, text, override, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_experiment(cfg, override, environ={})
    with pytest.raises(ConfigError, match="no such experiment config"):
        load_experiment(tmp_path / "missing.yaml", environ={})


def test_volume_names_never_collide():
    a = volume_names(Experiment(experimenter="Ana B", experiment="exp/1"))
    b = volume_names(Experiment(experimenter="ana", experiment="exp-2"))
    assert a == {"data": "retool-data-ana-b-exp-1", "models": "retool-models-ana-b-exp-1",
                 "checkpoints": "retool-checkpoints-ana-b-exp-1"}
    assert not set(a.values()) & set(b.values())
    with pytest.raises(ConfigError, match="longer than 63"):
        volume_names(Experiment(experiment="x" * 60))


def test_commands_use_the_stage_modules_and_pass_resources_and_overrides():
    exp = load_experiment(REPO / "config" / "modal" / "default.yaml", ["gpus=4", "sft.overrides=[trainer.total_epochs=1]"],
                          environ={})
    sft = launcher.sft_command(exp)
    assert sft[:4] == ["python", "-m", "recipe.retool.train", "sft"]
    assert "trainer.n_gpus_per_node=4" in sft and sft[-1] == "trainer.total_epochs=1"
    grpo = launcher.grpo_command(exp)
    assert grpo[4] == f"{launcher.CKPT_DIR}/sft-experiments/{exp.experiment}"  # latest SFT checkpoint by default
    assert launcher.grpo_command(exp, "/vol/models/x")[4] == "/vol/models/x"
    serve = launcher.serve_command(exp, "/m")
    assert serve[:3] == ["python", "-m", "sglang.launch_server"] and serve[serve.index("--tp") + 1] == "4"
    exp.eval["server"] = "vllm"
    assert launcher.serve_command(exp, "/m")[:2] == ["vllm", "serve"]
    exp.eval["server"] = "tgi"
    with pytest.raises(ConfigError, match="eval.server"):
        launcher.serve_command(exp, "/m")
    prep = launcher.prep_commands(exp)
    assert prep[0][:4] == ["python", "-m", "recipe.retool.data", "all"] and len(prep) == 4
    assert all("--tokenizer" in c for c in prep[1:])


def test_train_commands_compose_for_real(tmp_path):
    """The launcher's SFT/GRPO commands are accepted by the train module's dry run, overrides and all."""
    exp = load_experiment(REPO / "config" / "modal" / "smoke.yaml", environ={})
    for cmd in (launcher.sft_command(exp, str(tmp_path), exp.smoke["sft_overrides"]),
                launcher.grpo_command(exp, "Qwen/Qwen2.5-0.5B-Instruct", exp.smoke["grpo_overrides"])):
        proc = subprocess.run([sys.executable, *cmd[1:], "--dry-run"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert "trainer.n_gpus_per_node=1" in proc.stdout.split("# command")[-1]


def _step(root, stage, exp, n, shard=True):
    d = root / f"{stage}-experiments" / exp / f"global_step_{n}"
    d.mkdir(parents=True)
    if shard:
        (d / "model_world_size_1_rank_0.pt").write_text("x")
    return d


def test_checkpoint_listing_and_info(tmp_path):
    _step(tmp_path, "sft", "e", 10)
    _step(tmp_path, "sft", "e", 2)
    g = _step(tmp_path, "grpo", "e-grpo", 20)
    (g / "actor" / "merged_hf").mkdir(parents=True)
    written = launcher.write_checkpoint_info(tmp_path / "sft-experiments" / "e", "sft", "Qwen/Q", "/vol/data",
                                             "retool_sft", ["a=1"])
    assert len(written) == 2
    info = json.loads(written[0].read_text())
    assert info["stage"] == "sft" and info["base_model"] == "Qwen/Q" and len(info["config_hash"]) == 16
    assert info["config_hash"] == launcher.config_hash("retool_sft", ["a=1"]) != launcher.config_hash("retool_sft", [])
    # existing info files are not rewritten
    assert launcher.write_checkpoint_info(tmp_path / "sft-experiments" / "e", "sft", "x", "y", "retool_sft", []) == []
    rows = launcher.list_checkpoints(tmp_path)
    assert [(r["stage"], r["step"], r["merged"]) for r in rows] == [("grpo", 20, True), ("sft", 2, False), ("sft", 10, False)]
    assert rows[1]["info"]["step"] == 2
    assert launcher.merge_command(g)[-1] == str(g / "actor" / "merged_hf")


def test_env_file_secrets_never_reach_commands_or_logs(tmp_path):
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=hf_secret123\nWANDB_API_KEY=\nOTHER=keep-out\n# comment\n")
    secrets = launcher.load_env(env)
    assert secrets == {"HF_TOKEN": "hf_secret123"}  # unknown and empty keys are dropped
    assert launcher.logging_env(secrets) == {"WANDB_MODE": "offline", "SWANLAB_MODE": "local"}
    assert launcher.load_env(tmp_path / "missing.env") == {}
    assert launcher.redact("token hf_secret123 here", secrets) == "token *** here"
    exp = load_experiment(REPO / "config" / "modal" / "default.yaml", environ={})
    text = json.dumps(launcher.plan(exp))
    assert "hf_secret123" not in text


def test_dry_run_cli_prints_every_function(capsys):
    assert launcher.main(["--dry-run", "--config", str(REPO / "config" / "modal" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    for fn in ("prep_dataset", "download_model", "train", "train_grpo", "evaluate", "pipeline", "list_checkpoints",
               "merge_checkpoint", "check_sandbox_connection", "smoke", "list_models"):
        assert f"[{fn}]" in out
    assert '"gpu": "H100:8"' in out and "retool-checkpoints-default-qwen25-7b-retool" in out
    assert launcher.main(["--dry-run", "bogus=1"]) == 2


def test_modal_apps_import_with_the_real_package_and_register_every_function():
    import modal

    import recipe.retool.modal_app as m
    import recipe.retool.modal_sandbox as s

    for name in ("prep_dataset", "download_model", "train", "train_grpo", "train_dapo", "evaluate", "pipeline",
                 "list_checkpoints", "merge_checkpoint", "check_sandbox_connection", "smoke", "list_models"):
        assert isinstance(getattr(m, name), modal.Function), name
    assert isinstance(s.sandbox, modal.Function)
    assert m.VOLUME_NAMES["checkpoints"].startswith("retool-checkpoints-")
    assert m.GPU == "H100:8"


def test_the_public_sandbox_endpoint_requires_a_token(tmp_path):
    """The deployed sandbox refuses to serve without RETOOL_SANDBOX_TOKEN; the token is a known secret."""
    import recipe.retool.modal_sandbox as s

    (tmp_path / ".env").write_text("RETOOL_SANDBOX_TOKEN=abc123\nOTHER=x\n")
    assert launcher.load_env(tmp_path / ".env") == {"RETOOL_SANDBOX_TOKEN": "abc123"}
    assert "abc123" not in launcher.redact("token abc123", {"RETOOL_SANDBOX_TOKEN": "abc123"})
    with pytest.raises(RuntimeError, match="RETOOL_SANDBOX_TOKEN"):
        s.create_sandbox_app({})
    app = s.create_sandbox_app({"RETOOL_SANDBOX_TOKEN": "abc123"})
    guard = [m for m in app.user_middleware if m.cls.__name__ == "_Guard"]
    assert guard and guard[0].kwargs["token"] == "abc123"
