"""recipe.retool.cloud.launcher: experiment configs, volume names, commands, checkpoints, secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from recipe.retool.cloud import launcher
from recipe.retool.cloud.launcher import ConfigError, Experiment, load_experiment, volume_names

REPO = launcher.REPO_ROOT


def test_file_then_overrides_then_environment(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("experiment: e1\ngpus: 4\nsft:\n  overrides: [trainer.total_epochs=1]\n")
    exp = load_experiment(cfg, ["gpus=2", "grpo.config=retool_grpo_upstream"], environ={"RETOOL_EXPERIMENTER": "ana"})
    assert (exp.experiment, exp.gpus, exp.experimenter) == ("e1", 2, "ana")
    assert exp.sft.overrides == ["trainer.total_epochs=1"] and exp.sft.config == "retool_sft"  # merged, not replaced
    assert exp.grpo.config == "retool_grpo_upstream" and exp.model == Experiment().model
    assert isinstance(exp.timeouts.sft, int) and exp.image.engine is launcher.Engine.sglang


@pytest.mark.parametrize("override, message", [
    ("gpus=four", "override 'gpus=four': 'gpus' expects an integer, got 'four'"),
    ("timeouts.sft=soon", "override 'timeouts.sft=soon': 'timeouts.sft' expects an integer, got 'soon'"),
    ("sandbox.allow_unsafe=maybe", "override 'sandbox.allow_unsafe=maybe': 'sandbox.allow_unsafe' expects true or false, got 'maybe'"),
    ("eval.server=tgi", "override 'eval.server=tgi': 'eval.server' expects one of ['sglang', 'vllm'], got 'tgi'"),
    ("image.engine=trtllm", "override 'image.engine=trtllm': 'image.engine' expects one of ['sglang', 'vllm'], got 'trtllm'"),
    ("gpu_typo=A100", "override 'gpu_typo=A100': unknown key 'gpu_typo' (known: experimenter, experiment, model, gpu, gpus"),
    ("timeouts.sfx=1", "override 'timeouts.sfx=1': unknown key 'timeouts.sfx' (known in timeouts: prep, download, sft, grpo"),
    ("timeouts=5", "override 'timeouts=5': 'timeouts' is a section (prep, download, sft, grpo, eval, smoke), not a single value"),
    ("nodes", "override 'nodes': expected key=value"),
    ("gpus=0", "override 'gpus=0': 'gpus' must be ≥ 1, got 0"),
])
def test_bad_overrides_are_named_not_the_file(tmp_path, override, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("experiment: e1\ngpus: 4\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(cfg, [override], environ={})
    assert str(err.value).startswith(message), str(err.value)
    assert str(cfg) not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("gpus: 4\ngpu_typo: A100\n", "exp.yaml: unknown key 'gpu_typo'"),
    ("sft:\n  overide: []\n", "exp.yaml: unknown key 'sft.overide' (known in sft: config, overrides)"),
    ("timeouts:\n  sft: soon\n", "exp.yaml: 'timeouts.sft' expects an integer, got 'soon'"),
    ("sandbox:\n  allow_unsafe: maybe\n", "exp.yaml: 'sandbox.allow_unsafe' expects true or false, got 'maybe'"),
    ("nodes: 0\n", "exp.yaml: 'nodes' must be ≥ 1, got 0"),
    ("- a list\n", "exp.yaml: expected a mapping"),
    ("gpus: [\n", "exp.yaml: not valid YAML"),
])
def test_bad_config_files_are_named(tmp_path, text, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_experiment(cfg, environ={})
    assert str(err.value).startswith(f"{tmp_path}/{message}"), str(err.value)
    with pytest.raises(ConfigError, match="no such experiment config"):
        load_experiment(tmp_path / "missing.yaml", environ={})


def test_an_override_fixes_a_bad_file_value(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("nodes: 0\n")
    assert load_experiment(cfg, ["nodes=2"], environ={}).nodes == 2


def test_dry_run_cli_names_the_bad_override(capsys):
    assert launcher.main(["--dry-run", "gpus=four"]) == 2
    assert "error: override 'gpus=four': 'gpus' expects an integer, got 'four'" in capsys.readouterr().err


def test_volume_names_never_collide():
    a = volume_names(Experiment(experimenter="Ana B", experiment="exp/1"))
    b = volume_names(Experiment(experimenter="ana", experiment="exp-2"))
    assert a == {"data": "retool-data-ana-b-exp-1", "models": "retool-models-ana-b-exp-1",
                 "checkpoints": "retool-checkpoints-ana-b-exp-1"}
    assert not set(a.values()) & set(b.values())
    with pytest.raises(ConfigError, match="longer than 63"):
        volume_names(Experiment(experiment="x" * 60))


def test_commands_use_the_stage_modules_and_pass_resources_and_overrides():
    exp = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["gpus=4", "sft.overrides=[trainer.total_epochs=1]"],
                          environ={})
    sft = launcher.sft_command(exp)
    assert sft[:4] == ["python", "-m", "recipe.retool.train", "sft"]
    assert "trainer.n_gpus_per_node=4" in sft and sft[-1] == "trainer.total_epochs=1"
    grpo = launcher.grpo_command(exp)
    assert grpo[4] == f"{launcher.CKPT_DIR}/sft-experiments/{exp.experiment}"  # latest SFT checkpoint by default
    assert launcher.grpo_command(exp, "/vol/models/x")[4] == "/vol/models/x"
    serve = launcher.serve_command(exp, "/m")
    assert serve[:3] == ["python", "-m", "sglang.launch_server"] and serve[serve.index("--tp") + 1] == "4"
    vllm = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["eval.server=vllm"], environ={})
    assert launcher.serve_command(vllm, "/m")[:5] == ["python", "-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    prep = launcher.prep_commands(exp)
    assert prep[0][:4] == ["python", "-m", "recipe.retool.data", "all"] and len(prep) == 4
    assert all("--tokenizer" in c for c in prep[1:])


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_train_commands_compose_for_real(tmp_path, sample_data):
    """The launcher's SFT/GRPO commands are accepted by the train module's dry run, overrides and all
    (with the bundled samples in place of the data volume)."""
    exp = load_experiment(REPO / "config" / "experiments" / "smoke.yaml", environ={})
    data_dir = str(sample_data["rl"].parent.parent)
    for cmd in (launcher.sft_command(exp, str(tmp_path), exp.smoke.sft_overrides),
                launcher.grpo_command(exp, "Qwen/Qwen2.5-0.5B-Instruct", exp.smoke.grpo_overrides)):
        assert cmd[5] == launcher.DATA_DIR
        cmd[5] = data_dir
        proc = subprocess.run([sys.executable, *cmd[1:], "--dry-run"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert "trainer.n_gpus_per_node=1" in proc.stdout.split("# command")[-1]


def _step(root, stage, exp, n, shard=True):
    d = root / f"{stage}-experiments" / exp / f"global_step_{n}"
    d.mkdir(parents=True)
    if shard:
        (d / "model_world_size_1_rank_0.pt").write_text("x")
    return d


def test_checkpoint_info_is_written_before_the_run_and_survives_preemption(tmp_path):
    exp = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["sft.overrides=[trainer.total_epochs=1]"],
                          environ={})
    root = tmp_path / "sft-experiments" / "e"
    first = launcher.run_info(exp, "sft", launcher.sft_command(exp), exp.model)
    assert first["overrides"] == ["trainer.n_gpus_per_node=8", "trainer.nnodes=1", "trainer.total_epochs=1"]
    assert (first["config"], first["gpus"], first["nodes"]) == ("retool_sft", 8, 1)
    assert launcher.start_run(root, first) == []
    assert json.loads((root / launcher.RUN_INFO).read_text()) == first  # on the volume before training starts
    _step(tmp_path, "sft", "e", 2)
    _step(tmp_path, "sft", "e", 10)  # ... then the container is pre-empted: no stamp after the run
    second = launcher.run_info(load_experiment(REPO / "config" / "experiments" / "default.yaml", ["gpus=4"], environ={}),
                               "sft", launcher.sft_command(exp), exp.model)
    written = launcher.start_run(root, second)  # the rerun first describes the steps the pre-empted run saved
    assert sorted(p.parent.name for p in written) == ["global_step_10", "global_step_2"]
    info = json.loads((root / "global_step_10" / launcher.CHECKPOINT_INFO).read_text())
    assert info == {**first, "step": 10}  # the run that saved it, overrides included, not the rerun
    _step(tmp_path, "sft", "e", 20)
    assert [p.parent.name for p in launcher.stamp_checkpoints(root)] == ["global_step_20"]
    assert json.loads((root / "global_step_20" / launcher.CHECKPOINT_INFO).read_text())["gpus"] == 4
    assert launcher.stamp_checkpoints(root) == []  # existing info files are not rewritten


def test_config_hash_covers_overrides_gpus_and_nodes():
    h = launcher.config_hash("retool_sft", ["a=1"], 8, 1)
    assert len(h) == 16 and h == launcher.config_hash("retool_sft", ["a=1"], 8, 1)
    assert len({h, launcher.config_hash("retool_sft", [], 8, 1), launcher.config_hash("retool_sft", ["a=1"], 4, 1),
                launcher.config_hash("retool_sft", ["a=1"], 8, 2)}) == 4


def test_checkpoint_listing(tmp_path):
    _step(tmp_path, "sft", "e", 10)
    _step(tmp_path, "sft", "e", 2)
    g = _step(tmp_path, "grpo", "e-grpo", 20)
    (g / "actor" / "merged_hf").mkdir(parents=True)
    launcher.start_run(tmp_path / "sft-experiments" / "e", {"stage": "sft"})
    launcher.stamp_checkpoints(tmp_path / "sft-experiments" / "e")
    rows = launcher.list_checkpoints(tmp_path)
    assert [(r["stage"], r["step"], r["merged"]) for r in rows] == [("grpo", 20, True), ("sft", 2, False), ("sft", 10, False)]
    assert rows[1]["info"] == {"stage": "sft", "step": 2} and "info" not in rows[0]
    assert launcher.merge_command(g)[-1] == str(g / "actor" / "merged_hf")


def test_env_file_secrets_never_reach_commands_or_logs(tmp_path):
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=hf_secret123\nWANDB_API_KEY=\nOTHER=keep-out\n# comment\n")
    secrets = launcher.load_env(env)
    assert secrets == {"HF_TOKEN": "hf_secret123"}  # unknown and empty keys are dropped
    assert launcher.logging_env(secrets) == {"WANDB_MODE": "offline", "SWANLAB_MODE": "local"}
    assert launcher.load_env(tmp_path / "missing.env") == {}
    assert launcher.redact("token hf_secret123 here", secrets) == "token *** here"
    exp = load_experiment(REPO / "config" / "experiments" / "default.yaml", environ={})
    text = json.dumps(launcher.plan(exp))
    assert "hf_secret123" not in text


def test_dry_run_cli_prints_every_function(capsys):
    assert launcher.main(["--dry-run", "--config", str(REPO / "config" / "experiments" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    for fn in ("prep_dataset", "download_model", "train_sft", "train_grpo", "evaluate", "pipeline", "list_checkpoints",
               "merge_checkpoint", "check_sandbox_connection", "smoke", "list_models"):
        assert f"[{fn}]" in out
    assert '"gpu": "H100:8"' in out and "retool-checkpoints-default-qwen25-7b-retool" in out
    assert launcher.main(["--dry-run", "bogus=1"]) == 2


def test_modal_apps_import_with_the_real_package_and_register_every_function():
    import modal

    import recipe.retool.cloud.modal_app as m
    import recipe.retool.cloud.modal_sandbox as s

    for name in ("prep_dataset", "download_model", "train_sft", "train_grpo", "train_dapo", "evaluate", "pipeline",
                 "list_checkpoints", "merge_checkpoint", "check_sandbox_connection", "smoke", "list_models"):
        assert isinstance(getattr(m, name), modal.Function), name
    assert isinstance(s.sandbox, modal.Function)
    assert m.VOLUME_NAMES["checkpoints"].startswith("retool-checkpoints-")
    assert m.GPU == "H100:8"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (the dev extra installs tomli)
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_image_installs_pyprojects_dependencies_with_the_engines_extra():
    """The Modal image installs what `pip install -e ".[gpu]"` / `".[gpu-vllm]"` does (a --no-deps
    install of the package follows): pyproject's dependencies and the extra of image.engine, read from
    the one declaration, so the loggers and verl's extra imports are in it."""
    project = _pyproject()
    exp = load_experiment(REPO / "config" / "experiments" / "default.yaml", environ={})
    vllm = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["image.engine=vllm"], environ={})
    assert (exp.gpu_extra, vllm.gpu_extra) == ("gpu", "gpu-vllm")
    for e in (exp, vllm):
        assert launcher.image_requirements(e) == [*project["dependencies"], *project["optional-dependencies"][e.gpu_extra]]
    packages = launcher.image_requirements(exp)
    assert {"verl==0.9.1", "swanlab", "wandb", "TransferQueue==0.1.11", "sglang==0.5.13"} <= set(packages)
    assert not any(p.startswith("torch") for p in project["dependencies"])  # CPU installs bring their own torch
    assert "vllm==0.24.0" in launcher.image_requirements(vllm) and "sglang==0.5.13" not in launcher.image_requirements(vllm)


def test_requirements_are_read_from_the_given_pyproject(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["a==1", "b"]  # why a is pinned\n\n'
                         '[project.optional-dependencies]\ngpu = [\n    "c>=2",  # a comment\n]\n')
    assert launcher.read_requirements(pyproject=pyproject) == ["a==1", "b"]
    assert launcher.read_requirements("gpu", pyproject) == ["c>=2"]
    with pytest.raises(KeyError, match="no extra 'gpu-vllm' .*extras: gpu"):
        launcher.read_requirements("gpu-vllm", pyproject)


def _secrets_config(tmp_path):
    """An experiment config naming store secrets, and a .env with values that must never be printed."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("experiment: secrets-test\nsecrets: [retool-keys, team-hf]\nsandbox:\n  secrets: [retool-sandbox-token]\n"
                   "sft:\n  overrides: [engine.ulysses_sequence_parallel_size=1]\n")  # no flash-attn: see default.yaml
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=hf_dotenv_value_123\nRETOOL_SANDBOX_TOKEN=tok_dotenv_value_456\nWANDB_API_KEY=\n")
    return cfg, env


def test_dry_run_names_the_secret_sources_never_their_values(tmp_path, monkeypatch, capsys):
    cfg, env = _secrets_config(tmp_path)
    exp = load_experiment(cfg, environ={})
    assert exp.secrets == ["retool-keys", "team-hf"] and exp.sandbox.secrets == ["retool-sandbox-token"]
    assert Experiment().secrets == [] and Experiment().sandbox.secrets == []  # the store is opt-in
    monkeypatch.setattr(launcher, "ENV_FILE", env)
    assert launcher.main(["--dry-run", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert ("secrets: modal secret store [retool-keys, team-hf] then .env [HF_TOKEN, RETOOL_SANDBOX_TOKEN] "
            "(a later source wins on a shared key)") in lines
    # the sandbox gets its own store names and, from .env, the token only
    assert ("sandbox secrets: modal secret store [retool-sandbox-token] then .env [RETOOL_SANDBOX_TOKEN] "
            "(a later source wins on a shared key)") in lines
    assert "hf_dotenv_value_123" not in out + err and "tok_dotenv_value_456" not in out + err
    assert "WANDB_API_KEY" not in out  # empty in .env: not a source
    monkeypatch.setattr(launcher, "ENV_FILE", tmp_path / "missing.env")
    assert launcher.main(["--dry-run", "--config", str(REPO / "config" / "experiments" / "default.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "secrets: none" in lines
    assert "sandbox secrets: none (the deployed sandbox refuses to serve without RETOOL_SANDBOX_TOKEN)" in lines
    assert launcher.main(["--dry-run", "--config", str(cfg)]) == 0  # one source: nothing to win over
    assert "secrets: modal secret store [retool-keys, team-hf]" in capsys.readouterr().out.splitlines()


def test_store_secrets_come_before_the_env_file_so_env_wins(monkeypatch):
    """Modal applies a function's secrets in order, a later one winning on a shared key: the named
    store secrets first, then the .env values (the real modal package; from_name recorded, since
    there is no Modal cloud here to look a name up in)."""
    import modal

    calls = []
    real = modal.Secret.from_name

    def from_name(name, **kwargs):
        calls.append(name)
        return real(name, **kwargs)

    monkeypatch.setattr(modal.Secret, "from_name", from_name)
    secrets = launcher.modal_secrets(["retool-keys", "team-hf"], {"HF_TOKEN": "hf_value_789"})
    assert calls == ["retool-keys", "team-hf"]
    assert all(isinstance(s, modal.Secret) for s in secrets)
    assert [repr(s) for s in secrets] == ["modal.Secret.from_name('retool-keys')", "modal.Secret.from_name('team-hf')",
                                          "Secret.from_dict([HF_TOKEN])"]
    assert [repr(s) for s in launcher.modal_secrets([], {})] == ["Secret.from_dict([])"]


def test_modal_apps_get_the_store_secrets_of_the_config(tmp_path):
    """Every function of modal_app that gets secrets gets the config's store names then the .env keys
    (never a value), the same in the container (where .env is not read); the sandbox app gets only its
    own store names and the token."""
    cfg, env = _secrets_config(tmp_path)
    code = ("import json, sys, modal\nfrom pathlib import Path\nfrom recipe.retool.cloud import launcher\n"
            "launcher.ENV_FILE = Path(sys.argv[1])\n"
            "import recipe.retool.cloud.modal_app as m\nimport recipe.retool.cloud.modal_sandbox as s\n"
            "fns = {n: [repr(x) for x in f._spec_.secrets] for n, f in vars(m).items() if isinstance(f, modal.Function)}\n"
            "print(json.dumps({'fns': fns, 'sandbox': [repr(x) for x in s.sandbox._spec_.secrets]}))")
    environ = {k: v for k, v in os.environ.items() if k not in launcher.FORWARDED_ENV}
    environ["RETOOL_MODAL_CONFIG"] = str(cfg)
    runs = {}
    for where, prefix in (("local", ""), ("container", "import modal\nmodal.is_local = lambda: False\n")):
        proc = subprocess.run([sys.executable, "-c", prefix + code, str(env)], capture_output=True, text=True,
                              env=environ, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "hf_dotenv_value_123" not in proc.stdout + proc.stderr and "tok_dotenv_value_456" not in proc.stdout + proc.stderr
        runs[where] = json.loads(proc.stdout.strip().splitlines()[-1])
    store = ["modal.Secret.from_name('retool-keys')", "modal.Secret.from_name('team-hf')"]
    local, container = runs["local"], runs["container"]
    with_secrets = {n for n, s in local["fns"].items() if s}
    assert {"train_sft", "train_grpo", "evaluate", "smoke", "check_sandbox_connection"} <= with_secrets
    for name in with_secrets:
        assert local["fns"][name] == [*store, "Secret.from_dict([HF_TOKEN, RETOOL_SANDBOX_TOKEN])"], name
        assert container["fns"][name] == [*store, "Secret.from_dict([])"], name  # same sources, values stay local
    for name in set(local["fns"]) - with_secrets:  # e.g. list_models: no secrets at all
        assert not any("from_name" in s for s in local["fns"][name]), name
    assert local["sandbox"] == ["modal.Secret.from_name('retool-sandbox-token')", "Secret.from_dict([RETOOL_SANDBOX_TOKEN])"]
    assert container["sandbox"] == ["modal.Secret.from_name('retool-sandbox-token')", "Secret.from_dict([])"]


def test_experiment_names_are_forwarded_into_the_containers():
    """RETOOL_EXPERIMENTER / RETOOL_EXPERIMENT name the volumes locally; every function gets them as
    environment variables, so the config re-read inside the container names the same experiment."""
    assert launcher.container_env({"RETOOL_EXPERIMENT": "x", "HOME": "/root"}) == {"RETOOL_EXPERIMENT": "x"}
    code = ("import json, modal\nimport recipe.retool.cloud.modal_app as m\n"
            "fns = {n: repr(f._spec_.secrets) for n, f in vars(m).items() if isinstance(f, modal.Function)}\n"
            "print(json.dumps({'experiment': m.EXP.experiment, 'experimenter': m.EXP.experimenter, "
            "'volumes': m.VOLUME_NAMES, 'fns': fns}))")
    env = {**os.environ, "RETOOL_EXPERIMENTER": "ana", "RETOOL_EXPERIMENT": "exp7"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["experimenter"], out["experiment"]) == ("ana", "exp7")
    assert out["volumes"]["checkpoints"] == "retool-checkpoints-ana-exp7"
    assert len(out["fns"]) >= 12
    for name, secrets in out["fns"].items():
        assert "RETOOL_EXPERIMENTER" in secrets and "RETOOL_EXPERIMENT]" in secrets, (name, secrets)
    # Inside a container (modal.is_local() is False there, the names arrive as environment variables)
    # the functions must be defined with the same secrets: Modal counts them as dependencies and
    # refuses to start a function whose dependencies differ from the deployed definition.
    remote = subprocess.run([sys.executable, "-c", "import modal\nmodal.is_local = lambda: False\n" + code],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert json.loads(remote.stdout.strip().splitlines()[-1])["fns"] == out["fns"]


class _Status503(threading.Thread):
    """A real HTTP server that answers every request with 503 and counts them."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                self.send_response(503)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        super().__init__(target=self.server.serve_forever, daemon=True)
        self.start()

    def stop(self):
        self.server.shutdown()


def test_the_model_server_wait_sleeps_after_non_200_and_fails_after_its_time():
    from recipe.retool.processes import wait_until_healthy

    server = _Status503()
    try:
        start = time.time()
        with pytest.raises(RuntimeError, match=r"model server did not answer .* within 1s \(last: HTTP 503\)"):
            wait_until_healthy(f"http://127.0.0.1:{server.port}/v1/models", 1.0, what="model server", interval=0.25)
        assert time.time() - start >= 1.0 and server.requests <= 6  # it slept between tries
    finally:
        server.stop()


def test_modal_evaluation_never_runs_against_a_server_that_does_not_answer(monkeypatch, tiny_model_dir):
    """modal_app's evaluate: a model server that only answers 503 stops the evaluation with an error
    (before, the wait fell through after its tries and the evaluation ran against the dead server).
    The model server is a real process; the Modal volume commit and the eval command are stubbed."""
    from dataclasses import replace

    import recipe.retool.cloud.modal_app as m
    from recipe.retool.processes import free_port

    port = free_port()
    code = ("import sys\nfrom http.server import BaseHTTPRequestHandler, HTTPServer\n"
            "class H(BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n        self.send_response(503)\n        self.end_headers()\n"
            "HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    monkeypatch.setattr(m.EXP, "eval", replace(m.EXP.eval, port=port, server_start_timeout=3))
    monkeypatch.setattr(m.launcher, "serve_command", lambda exp, path, gpus: [sys.executable, "-c", code, str(port)])
    ran = []
    monkeypatch.setattr(m, "_run", lambda cmds, env=None: ran.extend(cmds))
    monkeypatch.setattr(m, "_commit", lambda: ran.append("commit"))
    monkeypatch.setattr(m, "_sandbox_url", lambda: "http://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="model server did not answer .* within 3s \\(last: HTTP 503\\)"):
        m._serve_and_evaluate(str(tiny_model_dir), 1, [])
    assert ran == []  # no evaluation, no commit of a half-written result


def test_the_public_sandbox_endpoint_requires_a_token(tmp_path):
    """The deployed sandbox refuses to serve without RETOOL_SANDBOX_TOKEN; the token is a known secret."""
    import recipe.retool.cloud.modal_sandbox as s

    (tmp_path / ".env").write_text("RETOOL_SANDBOX_TOKEN=abc123\nOTHER=x\n")
    assert launcher.load_env(tmp_path / ".env") == {"RETOOL_SANDBOX_TOKEN": "abc123"}
    assert "abc123" not in launcher.redact("token abc123", {"RETOOL_SANDBOX_TOKEN": "abc123"})
    with pytest.raises(RuntimeError, match="RETOOL_SANDBOX_TOKEN"):
        s.create_sandbox_app({})
    app = s.create_sandbox_app({"RETOOL_SANDBOX_TOKEN": "abc123"})
    guard = [m for m in app.user_middleware if m.cls.__name__ == "_Guard"]
    assert guard and guard[0].kwargs["token"] == "abc123"


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_a_cloud_run_the_trainer_would_refuse_stops_before_any_image_is_built(tmp_path):
    from recipe.retool.cloud.launcher import attention_problems, load_experiment

    # the shipped configs run SFT at Ulysses 1 (retool_packed), since their image has no flash-attn
    for cfg in sorted((REPO / "config" / "experiments").glob("*.yaml")):
        assert attention_problems(load_experiment(cfg, environ={})) == [], cfg
    # the template's Ulysses 4 without a flash-attn wheel would attend within each rank's slice
    exp = load_experiment(None, ["sft.overrides=[]"])
    [problem] = attention_problems(exp)
    assert problem.startswith("sft (retool_sft with sft.overrides)") and "Ulysses sequence parallelism 4" in problem
    assert "engine.ulysses_sequence_parallel_size=1" in problem
    assert attention_problems(load_experiment(None, ["sft.overrides=[]", "image.flash_attn_wheel=https://example.org/fa.whl"])) == []
    # a misspelt retool.kernels value would stop the cloud run at its first stage
    [problem] = attention_problems(load_experiment(None, ["grpo.overrides=[retool.kernels=fast]"]))
    assert problem.startswith("grpo (retool_grpo_template)") and "expected one of auto, off" in problem
    proc = subprocess.run([sys.executable, "-m", "recipe.retool.cloud.launcher", "--dry-run", "sft.overrides=[]"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "would be refused at launch" in proc.stderr and not proc.stdout


def test_a_cluster_experiment_runs_each_training_stage_through_the_cluster_runner(capsys):
    """nodes: 2 — every container of train_sft / train_grpo runs the stage's one-node command (with
    trainer.nnodes=2) through recipe.retool.cluster, with its rank and the cluster's addresses."""
    from recipe.retool.cluster import main as cluster_main

    exp = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["nodes=2"], environ={})
    plan = launcher.plan(exp)
    for fn, stage, kind, inner in (("train_sft", "sft", "torchrun", launcher.sft_command(exp)),
                                   ("train_grpo", "grpo", "ray", launcher.grpo_command(exp))):
        assert plan[fn]["nodes"] == 2 and "trainer.nnodes=2" in inner
        (cmd,) = plan[fn]["commands"]
        assert cmd[:3] == ["python", "-m", "recipe.retool.cluster"] and cmd[cmd.index("--") + 1:] == inner
        assert cmd[cmd.index("--launcher") + 1] == kind and cmd[cmd.index("--rank") + 1] == "<rank>"
        node = launcher.node_command(exp, stage, 1, ["10.0.0.1", "10.0.0.2"], inner)
        assert node[3:node.index("--")] == ["--launcher", kind, "--rank", "1", "--addresses", "10.0.0.1,10.0.0.2",
                                             "--port", "6379" if kind == "ray" else "29500",
                                             *(["--gpus", "8"] if kind == "ray" else [])]
        with pytest.raises(SystemExit) as parsed:  # the runner's own parser reads what the plan writes
            cluster_main([*node[3:node.index("--")], "--help"])
        assert parsed.value.code == 0
    capsys.readouterr()
    single = launcher.plan(load_experiment(REPO / "config" / "experiments" / "default.yaml", environ={}))
    assert single["train_grpo"]["commands"][0][:3] == ["python", "-m", "recipe.retool.train"]


def test_a_cluster_launch_shares_one_ray_token_with_its_nodes():
    one = load_experiment(REPO / "config" / "experiments" / "default.yaml", environ={})
    two = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["nodes=2"], environ={})
    assert launcher.with_cluster_token(one, {"HF_TOKEN": "x"}) == {"HF_TOKEN": "x"}
    made = launcher.with_cluster_token(two, {"HF_TOKEN": "x"})
    assert len(made["RAY_AUTH_TOKEN"]) == 64 and made["HF_TOKEN"] == "x"
    assert made["RAY_AUTH_TOKEN"] != launcher.with_cluster_token(two, {})["RAY_AUTH_TOKEN"]  # one per launch
    assert launcher.with_cluster_token(two, {"RAY_AUTH_TOKEN": "mine" * 8})["RAY_AUTH_TOKEN"] == "mine" * 8


def test_modal_clusters_the_training_functions_of_a_multi_node_experiment(tmp_path):
    cfg = tmp_path / "two.yaml"
    cfg.write_text((REPO / "config" / "experiments" / "default.yaml").read_text().replace("\nnodes: 1 ", "\nnodes: 2 "))
    # Modal keeps a function's cluster size inside its definition: record what modal.clustered is given
    code = ("import json, modal\nsizes = {}\nreal = modal.clustered\n"
            "def clustered(*, size, **kw):\n"
            "    def deco(fn):\n        sizes[fn.__name__] = [size, kw.get('rdma')]\n        return real(size=size, **kw)(fn)\n    return deco\n"
            "modal.clustered = clustered\nimport recipe.retool.cloud.modal_app as m\nprint(json.dumps(sizes))")
    environ = {k: v for k, v in os.environ.items() if k not in launcher.FORWARDED_ENV}
    runs = {}
    for nodes, path in ((2, cfg), (1, REPO / "config" / "experiments" / "default.yaml")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={**environ, "RETOOL_MODAL_CONFIG": str(path)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[nodes] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs == {2: {"train_sft": [2, True], "train_grpo": [2, True], "train_dapo": [2, True]}, 1: {}}


def test_each_container_of_a_modal_cluster_runs_its_rank_of_the_plan(tmp_path):
    """modal_app's containers read their rank and the cluster's IPv4 addresses from Modal (stood in
    for here: no Modal cloud) and run launcher.node_command with them; rank 0 keeps the run's record."""
    cfg = tmp_path / "two.yaml"
    cfg.write_text((REPO / "config" / "experiments" / "default.yaml").read_text().replace("\nnodes: 1 ", "\nnodes: 2 "))
    code = ("import json, modal\n"
            "class Here:\n"
            "    def container_rank(self): return 1\n"
            "    def container_ips(self, family='ipv6'): return {'ipv4': ['10.1.0.5', '10.1.0.6']}[family]\n"
            "modal.Cluster.from_context = staticmethod(lambda: Here())\n"
            "import recipe.retool.cloud.modal_app as m\n"
            "print(json.dumps({s: m._on_this_node(s, ['python', '-m', 'x', s]) for s in ('sft', 'grpo')}))")
    environ = {k: v for k, v in os.environ.items() if k not in launcher.FORWARDED_ENV}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**environ, "RETOOL_MODAL_CONFIG": str(cfg)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    exp = load_experiment(cfg, environ={})
    for stage in ("sft", "grpo"):
        cmd, record = got[stage]
        assert cmd == launcher.node_command(exp, stage, 1, ["10.1.0.5", "10.1.0.6"], ["python", "-m", "x", stage])
        assert record is False  # rank 1: rank 0 writes run_info.json and stamps the checkpoints


def test_a_cluster_takes_whole_hosts_and_asks_for_rdma():
    two = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["nodes=2"], environ={})
    assert launcher.cluster_problems(two) == [] and two.rdma is True
    half = load_experiment(REPO / "config" / "experiments" / "default.yaml", ["nodes=2", "gpus=4"], environ={})
    (problem,) = launcher.cluster_problems(half)
    assert "each take all 8 GPUs of their host" in problem
    assert launcher.main(["--dry-run", "nodes=2", "gpus=4"]) == 2
    assert launcher.cluster_problems(load_experiment(REPO / "config" / "experiments" / "default.yaml", ["gpus=4"],
                                                     environ={})) == []
