"""The cloud launcher's plain-Python half: experiment configs, volume names, stage commands,
checkpoint discovery and bookkeeping, secrets (Modal's secret store and ``.env``), the image's
dependencies (pyproject.toml). ``modal_app.py`` is a thin shell around this module, so all of it is
testable without Modal's cloud.

    python -m recipe.retool.cloud.launcher --dry-run [--config config/experiments/default.yaml] [key=value ...]

prints every Modal function's command and resources for the experiment config without running
anything. Config values can be overridden with dotted ``key=value`` arguments (``gpus=4``,
``sft.overrides=[trainer.total_epochs=1]``); ``RETOOL_EXPERIMENTER`` / ``RETOOL_EXPERIMENT``
override the names (and are forwarded into the containers).

The config is typed: :class:`Experiment` and its sections are OmegaConf structured configs, so a
wrong type (``gpus=four``), an unknown key or a value outside a choice (``eval.server=tgi``) is
an error that names the override or the YAML file it came from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from recipe.retool import REPO_ROOT
from recipe.retool.cluster import RAY_PORT, TOKEN_ENV, TORCH_PORT
from recipe.retool.experiment import (  # noqa: F401  (the experiment schema, re-exported for the Modal apps)
    DEFAULT_CONFIG,
    FORWARDED_ENV,
    GPU_EXTRAS,
    ConfigError,
    DataSources,
    Engine,
    EvalStage,
    Experiment,
    GrpoStage,
    ImageSettings,
    Layout,
    ModelServer,
    SandboxSettings,
    SftStage,
    SmokeRun,
    Timeouts,
    commands,
    load_experiment,
    resource_overrides,
)
from recipe.retool.settings import SANDBOX_TOKEN_ENV, SANDBOX_URL_ENV
from recipe.retool.stages import merge_command as stages_merge_command
from recipe.retool.stages import server_ready_url

# The keys the launcher takes from a local .env (others there are ignored): sent to the containers as a
# Modal secret together with the named secrets of Modal's secret store (``secrets:`` in the config)
SECRET_KEYS = ("HF_TOKEN", "WANDB_API_KEY", "SWANLAB_API_KEY", SANDBOX_TOKEN_ENV, TOKEN_ENV)
ENV_FILE = REPO_ROOT / ".env"
# the bearer token of the sandbox web endpoint: its server requires it, our tool and evaluation send it
# The one declaration of every dependency: `dependencies` (every install) and the extras; the Modal
# image installs `dependencies` + the GPU extra of image.engine from it, as `pip install -e ".[gpu]"` does
PYPROJECT = REPO_ROOT / "pyproject.toml"

# where the volumes are mounted inside the containers
DATA_DIR = "/vol/data"
MODELS_DIR = "/vol/models"
CKPT_DIR = "/vol/checkpoints"
LAYOUT = Layout(data=DATA_DIR, checkpoints=CKPT_DIR, models=MODELS_DIR)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "x"


def volume_names(exp: Experiment) -> dict[str, str]:
    """Per experimenter and experiment, so two people or two experiments never collide."""
    suffix = f"{_slug(exp.experimenter)}-{_slug(exp.experiment)}"
    names = {kind: f"retool-{kind}-{suffix}" for kind in ("data", "models", "checkpoints")}
    for name in names.values():
        if len(name) > 63:
            raise ConfigError(f"volume name '{name}' is longer than 63 characters; shorten experimenter/experiment")
    return names


def model_dir(model_id: str) -> str:
    return LAYOUT.model_dir(model_id)


def _py(module: str, *args: str) -> list[str]:
    return ["python", "-m", module, *args]


def prep_commands(exp: Experiment, tokenizer: str | None = None, sft_extra: Sequence[str] = (),
                  grpo_extra: Sequence[str] = ()) -> list[list[str]]:
    """Data, then the prefilter of each file by the budget of the config (and overrides) that trains on it."""
    staged = replace(exp, sft=replace(exp.sft, overrides=[*exp.sft.overrides, *map(str, sft_extra)]),
                     grpo=replace(exp.grpo, overrides=[*exp.grpo.overrides, *map(str, grpo_extra)]))
    c = commands(staged, LAYOUT, tokenizer=tokenizer)
    return [c["data"], *c["prefilter"]]


def sft_command(exp: Experiment, model: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    return [*commands(exp, LAYOUT, sft_model=model)["sft"], *map(str, extra)]


# how each training stage spreads over the nodes of a cluster (recipe/retool/cluster.py)
CLUSTER_LAUNCHERS = {"sft": "torchrun", "grpo": "ray"}


def node_command(exp: Experiment, stage: str, rank: int | str, addresses: Sequence[str], cmd: Sequence[str],
                 port: int | None = None, cpus: int | None = None) -> list[str]:
    """What one node of a cluster runs for a stage: the stage's command through
    ``recipe.retool.cluster`` with the node's rank and every node's address (rank 0's first), as a
    Modal cluster tells its containers; the same command on one's own machines. ``port``: the head's
    (default Ray's or torchrun's own); ``cpus``: what a node offers Ray (default: detected)."""
    kind = CLUSTER_LAUNCHERS[stage]
    args = ["--launcher", kind, "--rank", str(rank), "--addresses", ",".join(addresses),
            "--port", str(port or (RAY_PORT if kind == "ray" else TORCH_PORT))]
    if kind == "ray":
        args += ["--gpus", str(exp.gpus), *(["--cpus", str(cpus)] if cpus else [])]
    return _py("recipe.retool.cluster", *args, "--", *cmd)


def with_cluster_token(exp: Experiment, env_values: Mapping[str, str]) -> dict[str, str]:
    """The ``.env`` secrets sent to the containers, with the Ray cluster's shared token when the
    stages span several nodes: ``RAY_AUTH_TOKEN`` from ``.env``, else a random one made when the app is
    defined (each ``modal run``; a ``modal deploy`` keeps its own). It comes after the store's
    secrets, so a token kept there is replaced by this one, the same on every node."""
    out = dict(env_values)
    if exp.nodes > 1 and not out.get(TOKEN_ENV):
        import secrets

        out[TOKEN_ENV] = secrets.token_hex(32)
    return out


def sft_checkpoint_root(exp: Experiment) -> str:
    return commands(exp, LAYOUT)["sft_root"]


def grpo_checkpoint_root(exp: Experiment) -> str:
    return commands(exp, LAYOUT)["grpo_root"]


def grpo_command(exp: Experiment, sft_model: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    if sft_model:
        exp = replace(exp, grpo=replace(exp.grpo, sft_checkpoint=sft_model))
    return [*commands(exp, LAYOUT)["grpo"], *map(str, extra)]


def serve_command(exp: Experiment, model_path: str, gpus: int | None = None) -> list[str]:
    return commands(exp, LAYOUT)["serve"](model_path, gpus or exp.gpus)


def model_server_url(exp: Experiment) -> str:
    """What the evaluation waits for before it starts: the model server's model list."""
    return server_ready_url(exp.eval.port)


def eval_command(exp: Experiment, output: str, sandbox_url: str, extra: Sequence[str] = ()) -> list[str]:
    return commands(exp, LAYOUT)["eval"](output, sandbox_url, list(map(str, extra)))


def merge_command(step_dir: Path) -> list[str]:
    shard_dir = step_dir / "actor" if (step_dir / "actor").is_dir() else step_dir
    return stages_merge_command(shard_dir, python="python")


def list_checkpoints(root: str | Path = CKPT_DIR) -> list[dict[str, Any]]:
    """Every ``global_step_N`` under ``{sft,grpo}-experiments/<exp>/``, with its info file if any."""
    from recipe.retool.train import STEP_DIR

    out = []
    root = Path(root)
    for stage_dir in sorted(root.glob("*-experiments")):
        for exp_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            for step_dir in sorted((p for p in exp_dir.iterdir() if STEP_DIR.match(p.name)),
                                   key=lambda p: int(p.name.split("_")[-1])):
                info_path = step_dir / CHECKPOINT_INFO
                info = json.loads(info_path.read_text()) if info_path.exists() else {}
                out.append({"stage": stage_dir.name.split("-")[0], "experiment": exp_dir.name,
                            "step": int(step_dir.name.split("_")[-1]), "path": str(step_dir),
                            "merged": (step_dir / "merged_hf").exists() or (step_dir / "actor" / "merged_hf").exists(),
                            **({"info": info} if info else {})})
    return out


def config_hash(config_name: str, overrides: Sequence[str], gpus: int, nodes: int) -> str:
    """Hash of the recipe YAMLs, the overrides and the GPU and node counts: two runs with the same
    hash ran the same config on the same number of GPUs (batch sizes per GPU depend on it)."""
    from recipe.retool import CONFIG_DIR

    h = hashlib.sha256()
    for f in sorted(CONFIG_DIR.rglob("*.yaml")):
        h.update(f.name.encode() + f.read_bytes())
    h.update(json.dumps([config_name, *overrides, {"gpus": gpus, "nodes": nodes}]).encode())
    return h.hexdigest()[:16]


CHECKPOINT_INFO = "checkpoint_info.json"  # in each global_step_N: which run saved it
RUN_INFO = "run_info.json"  # in the experiment directory: the run that is saving steps now


def run_info(exp: Experiment, stage: str, command: Sequence[str], base_model: str) -> dict[str, Any]:
    """What a training run is, read from the exact command it runs: config, every override (the
    resource ones included), GPUs and nodes, base model, data, and the hash of all of it."""
    i = list(command).index("--config")
    config_name, overrides = command[i + 1], [str(a) for a in command[i + 2:]]
    return {"stage": stage, "experimenter": exp.experimenter, "experiment": exp.experiment,
            "base_model": base_model, "data": DATA_DIR, "config": config_name, "overrides": overrides,
            "gpu": exp.gpu, "gpus": exp.gpus, "nodes": exp.nodes,
            "config_hash": config_hash(config_name, overrides, exp.gpus, exp.nodes),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def start_run(exp_dir: str | Path, info: dict[str, Any]) -> list[Path]:
    """Before a run: record it in ``EXP_DIR/run_info.json``. Steps an earlier run saved but did not
    describe (it was pre-empted) are first described with *that* run's record, so they never get
    this run's metadata. Returns the info files written for such steps."""
    exp_dir = Path(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    written = stamp_checkpoints(exp_dir)
    (exp_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    return written


def stamp_checkpoints(exp_dir: str | Path) -> list[Path]:
    """Give each ``global_step_N`` without an info file the record of the run that saved it (the
    one in ``run_info.json``). Called when a run ends, and by :func:`start_run` for a pre-empted one."""
    from recipe.retool.train import STEP_DIR

    exp_dir = Path(exp_dir)
    run = exp_dir / RUN_INFO
    if not run.is_file():
        return []
    info = json.loads(run.read_text())
    written = []
    for step_dir in sorted(exp_dir.iterdir()):
        m = STEP_DIR.match(step_dir.name)
        target = step_dir / CHECKPOINT_INFO
        if m and step_dir.is_dir() and not target.exists():
            target.write_text(json.dumps({**info, "step": int(m.group(1))}, indent=2))
            written.append(target)
    return written


def load_env(path: str | Path = ENV_FILE) -> dict[str, str]:
    """The known secrets (:data:`SECRET_KEYS`) from a local ``.env`` (missing file → {}); other keys
    and empty values are ignored, so an empty line in ``.env`` never hides a value from the secret store."""
    from dotenv import dotenv_values

    path = Path(path)
    if not path.exists():
        return {}
    values = dotenv_values(path)
    return {k: v for k, v in values.items() if k in SECRET_KEYS and v}


def logging_env(secrets: Mapping[str, str]) -> dict[str, str]:
    """Offline/local logging modes for the loggers whose key is absent. Called in the container on its
    environment, where the keys of every secret source (store and ``.env``) have arrived."""
    env = {}
    if "WANDB_API_KEY" not in secrets:
        env["WANDB_MODE"] = "offline"
    if "SWANLAB_API_KEY" not in secrets:
        env["SWANLAB_MODE"] = "local"
    return env


def redact(text: str, secrets: dict[str, str]) -> str:
    for value in secrets.values():
        if value:
            text = text.replace(value, "***")
    return text


def container_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment the Modal functions get from the local shell: the experiment names, so paths
    computed inside the containers (from the re-imported config) match the volumes named locally."""
    return {env: environ[env] for env in FORWARDED_ENV if environ.get(env)}


def secret_sources(exp: Experiment, env_keys: Sequence[str]) -> dict[str, list[str]]:
    """Where the functions' secrets come from, in the order Modal applies them (a later source wins on
    a key both set): the named secrets of the store, then ``.env``. Names and keys only, never values."""
    return {"modal secret store": list(exp.secrets), ".env": sorted(env_keys)}


def sandbox_secret_sources(exp: Experiment, env_keys: Sequence[str]) -> dict[str, list[str]]:
    """The same for the sandbox app: its own store names, then only the token from ``.env``."""
    return {"modal secret store": list(exp.sandbox.secrets), ".env": [k for k in env_keys if k == SANDBOX_TOKEN_ENV]}


def modal_secrets(names: Sequence[str], env_values: Mapping[str, str]) -> list[Any]:
    """The ``modal.Secret`` list of a function, in the order Modal applies it (on a key both set, the
    later wins): ``modal.Secret.from_name`` for each store name, then one from the ``.env`` values."""
    import modal

    return [*(modal.Secret.from_name(name) for name in names), modal.Secret.from_dict(dict(env_values))]


def describe_sources(sources: Mapping[str, Sequence[str]]) -> str:
    """One line for ``--dry-run``: each source that is used, in order."""
    parts = [f"{where} [{', '.join(names)}]" for where, names in sources.items() if names]
    return " then ".join(parts) + (" (a later source wins on a shared key)" if len(parts) > 1 else "") or "none"


def image_requirements(exp: Experiment) -> list[str]:
    """What the Modal image installs, in one resolve: pyproject's ``dependencies`` and the GPU extra of
    ``image.engine`` (exactly ``pip install -e ".[gpu]"`` / ``".[gpu-vllm]"``)."""
    return [*read_requirements(), *read_requirements(exp.gpu_extra)]


def read_requirements(extra: str | None = None, pyproject: Path = PYPROJECT) -> list[str]:
    """pyproject's ``[project] dependencies`` (``extra`` None) or one of its optional-dependencies extras."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev and modal extras install tomli
        import tomli as tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    if extra is None:
        return list(project["dependencies"])
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise KeyError(f"{pyproject}: no extra '{extra}' (extras: {', '.join(extras)})")
    return list(extras[extra])


def smoke_experiment(exp: Experiment) -> Experiment:
    """The experiment as the ``smoke`` function runs it: one GPU, the smoke model, the bundled samples."""
    return replace(exp, gpus=1, nodes=1, model=exp.smoke.model, data=replace(exp.data, sample=True))


def attention_problems(exp: Experiment) -> list[str]:
    """What ``retool.attention`` (recipe/retool/perf/attention.py) or ``retool.kernels`` would refuse in the
    cloud, found here before any image is built: the image has CUDA, Triton, liger-kernel and PyTorch's
    packed attention, and flash-attn only with ``image.flash_attn_wheel``. The train functions' own
    launch check stays the final word."""
    from recipe.retool.perf.attention import Environment, resolve
    from recipe.retool.perf.kernels import KernelEnvironment
    from recipe.retool.perf.kernels import resolve as resolve_kernels
    from recipe.retool.train import compose, path_overrides, split_config_arg

    image = Environment(flash_attn=bool(exp.image.flash_attn_wheel), cuda=True, varlen=True)
    problems = []
    for stage, section, experiment in (("sft", exp.sft, exp.sft_name), ("grpo", exp.grpo, exp.grpo_name)):
        name, config_dir = split_config_arg(section.config)
        cfg = compose(name, [*path_overrides(model_dir(exp.model), DATA_DIR, CKPT_DIR, experiment),
                             *resource_overrides(exp), *section.overrides], config_dir)
        choice, _ = resolve(cfg, stage, image)
        if choice.problem:
            problems.append(f"{stage} ({section.config} with {stage}.overrides): {choice.problem}; with "
                            "image.flash_attn_wheel unset, add engine.ulysses_sequence_parallel_size=1 to sft.overrides"
                            if stage == "sft" else f"{stage} ({section.config}): {choice.problem}")
        kernels, _ = resolve_kernels(cfg, stage, env=KernelEnvironment(cuda=True, triton=True, liger=True))
        if kernels.problem:
            problems.append(f"{stage} ({section.config}): {kernels.problem}")
    return problems


GPUS_PER_HOST = 8  # H100 / H200 / A100 hosts


def cluster_problems(exp: Experiment) -> list[str]:
    """What Modal would refuse of a multi-node experiment: each container of a cluster takes every GPU
    of its host."""
    if exp.nodes > 1 and exp.gpus != GPUS_PER_HOST:
        return [f"nodes: {exp.nodes} with gpus: {exp.gpus}: a Modal cluster's containers each take all "
                f"{GPUS_PER_HOST} GPUs of their host (gpus: {GPUS_PER_HOST}, or nodes: 1)"]
    return []


def plan(exp: Experiment) -> dict[str, dict[str, Any]]:
    """Every Modal function: its commands and resources (what ``--dry-run`` prints)."""
    gpu = f"{exp.gpu}:{exp.gpus}"
    t = exp.timeouts
    sandbox_url = exp.sandbox.url or f"<deployed {exp.sandbox.app_name} URL>"
    eval_out = f"{CKPT_DIR}/eval/{exp.experiment}/<checkpoint>.json"
    smoke_exp = smoke_experiment(exp)

    def on_each_node(stage: str, cmd: list[str]) -> list[str]:
        if exp.nodes == 1:
            return cmd
        return node_command(exp, stage, "<rank>", [f"<ip of node {i}>" for i in range(exp.nodes)], cmd)

    return {
        "prep_dataset": {"gpu": None, "timeout": t.prep, "commands": prep_commands(exp)},
        "download_model": {"gpu": None, "timeout": t.download,
                           "commands": [_py("recipe.retool.cloud.launcher", "--download", exp.model, model_dir(exp.model))]},
        "train_sft": {"gpu": gpu, "nodes": exp.nodes, "timeout": t.sft, "commands": [on_each_node("sft", sft_command(exp))]},
        "train_grpo": {"gpu": gpu, "nodes": exp.nodes, "timeout": t.grpo, "commands": [on_each_node("grpo", grpo_command(exp))],
                       "env": {SANDBOX_URL_ENV: sandbox_url}},
        "evaluate": {"gpu": gpu, "timeout": t.eval,
                     "commands": [serve_command(exp, "<checkpoint>/merged_hf"), eval_command(exp, eval_out, sandbox_url)]},
        "pipeline": {"gpu": None, "timeout": t.sft + t.grpo + t.eval,
                     "commands": [["prep_dataset"], ["train_sft"], ["train_grpo"], ["evaluate"]]},
        "list_checkpoints": {"gpu": None, "timeout": 300, "commands": []},
        "merge_checkpoint": {"gpu": None, "timeout": 3600,
                             "commands": [merge_command(Path(f"{CKPT_DIR}/<stage>-experiments/<exp>/global_step_<N>"))]},
        "check_sandbox_connection": {"gpu": None, "timeout": 300, "commands": [], "sandbox_url": sandbox_url},
        "smoke": {"gpu": f"{exp.gpu}:1", "timeout": t.smoke, "commands": [
            *prep_commands(smoke_exp, sft_extra=smoke_exp.smoke.sft_overrides, grpo_extra=smoke_exp.smoke.grpo_overrides),
            sft_command(smoke_exp, model_dir(smoke_exp.model), smoke_exp.smoke.sft_overrides),
            grpo_command(smoke_exp, None, smoke_exp.smoke.grpo_overrides),
            eval_command(smoke_exp, f"{CKPT_DIR}/eval/smoke.json", sandbox_url, smoke_exp.smoke.eval_args)]},
        "list_models": {"gpu": None, "timeout": 300, "commands": []},
    }


def download(model_id: str, dest: str) -> str:
    """Snapshot a hub model into the models volume (resumes partial downloads)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, local_dir=dest, token=os.environ.get("HF_TOKEN") or None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.cloud.launcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--download", nargs=2, metavar=("MODEL", "DEST"),
                   help="download a hub model to a directory (used inside the cloud), then exit")
    p.add_argument("--config", default=None, help=f"experiment YAML (default {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--dry-run", action="store_true", help="print every function's commands and resources")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the experiment config")
    args = p.parse_args(argv)
    if args.download:
        print(download(*args.download))
        return 0
    try:
        exp = load_experiment(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = attention_problems(exp) + cluster_problems(exp)
    if problems:
        print("error: the cloud run would be refused at launch:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    print(f"experiment {exp.experimenter}/{exp.experiment}; volumes {volume_names(exp)}")
    env_keys = list(load_env(ENV_FILE))  # the keys only: no value is ever printed
    print(f"secrets: {describe_sources(secret_sources(exp, env_keys))}")
    sandbox = sandbox_secret_sources(exp, env_keys)
    print(f"sandbox secrets: {describe_sources(sandbox)}"
          + ("" if any(sandbox.values()) else f" (the deployed sandbox refuses to serve without {SANDBOX_TOKEN_ENV})"))
    for name, item in plan(exp).items():
        res = {k: v for k, v in item.items() if k != "commands"}
        print(f"\n[{name}] {json.dumps(res)}")
        for cmd in item["commands"]:
            print("  $ " + shlex.join(cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
