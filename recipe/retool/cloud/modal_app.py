"""ReTool on Modal: every pipeline stage as a Modal function, from one experiment config.

    modal deploy recipe/retool/cloud/modal_sandbox.py                      # once: the sandbox web endpoint
    modal run recipe/retool/cloud/modal_app.py::download_model
    modal run recipe/retool/cloud/modal_app.py::prep_dataset
    modal run recipe/retool/cloud/modal_app.py::train_sft                  # SFT, 8 GPUs
    modal run recipe/retool/cloud/modal_app.py::train_grpo                 # GRPO from the latest SFT checkpoint
    modal run recipe/retool/cloud/modal_app.py::evaluate
    modal run recipe/retool/cloud/modal_app.py::pipeline                   # SFT → GRPO → eval
    modal run recipe/retool/cloud/modal_app.py::dry_run                    # print every command, run nothing

The experiment config is ``RETOOL_MODAL_CONFIG`` (default ``config/experiments/default.yaml``), read when
this file is imported (locally and in the containers) because volume names and GPU counts are part
of the function definitions. Each function is a thin wrapper: commands come from
:mod:`recipe.retool.cloud.launcher`, which is where the logic (and its tests) live.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import modal

from recipe.retool.cloud import launcher
from recipe.retool.settings import SANDBOX_URL_ENV

REPO = launcher.REPO_ROOT
EXP = launcher.load_experiment(os.environ.get("RETOOL_MODAL_CONFIG") or None)
if modal.is_local() and (_refused := launcher.attention_problems(EXP) + launcher.cluster_problems(EXP)):  # before any image is built
    raise SystemExit("error: the cloud run would be refused at launch:\n  " + "\n  ".join(_refused))
# RETOOL_EXPERIMENTER / RETOOL_EXPERIMENT from the local shell, set again in every container (where
# this file is imported once more), so that paths computed there name the same experiment. Computed
# from the environment alone, not under modal.is_local(): in the container the same variables give the
# same value, and Modal refuses a function whose secrets (env) differ from the deployed definition.
ENV = launcher.container_env(os.environ)
VOLUME_NAMES = launcher.volume_names(EXP)
GPU = f"{EXP.gpu}:{EXP.gpus}"
T = EXP.timeouts

app = modal.App(f"retool-{launcher._slug(EXP.experimenter)}-{launcher._slug(EXP.experiment)}")

data_volume = modal.Volume.from_name(VOLUME_NAMES["data"], create_if_missing=True)
models_volume = modal.Volume.from_name(VOLUME_NAMES["models"], create_if_missing=True)
checkpoints_volume = modal.Volume.from_name(VOLUME_NAMES["checkpoints"], create_if_missing=True)
VOLUMES = {launcher.DATA_DIR: data_volume, launcher.MODELS_DIR: models_volume, launcher.CKPT_DIR: checkpoints_volume}

# Secrets come from Modal's secret store (`secrets:` in the experiment config: the same names in the
# container, where this file is imported again) and then from a local .env (read only locally; never
# in the image, never printed), which wins on a key both set. In the container they are environment variables.
_SECRETS = launcher.with_cluster_token(EXP, launcher.load_env(launcher.ENV_FILE)) if modal.is_local() else {}
SECRETS = launcher.modal_secrets(EXP.secrets, _SECRETS)

_image = (
    modal.Image.from_registry(EXP.image.base, add_python=EXP.image.python)
    .apt_install("git", "build-essential", "curl", "libnuma1")  # libnuma: sglang-kernel links libnuma.so.1
    # pyproject's dependencies + the engine's GPU extra, one resolve: `pip install -e ".[gpu]"`
    .pip_install(*launcher.image_requirements(EXP))
)
if EXP.image.flash_attn_wheel:
    _image = _image.pip_install(EXP.image.flash_attn_wheel)
_config = Path(os.environ.get("RETOOL_MODAL_CONFIG") or launcher.DEFAULT_CONFIG).resolve()
image = (
    _image.env({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": f"{launcher.MODELS_DIR}/hf-cache",
                # the containers re-import this file: point them at the same experiment config
                "RETOOL_MODAL_CONFIG": f"/opt/retool/{_config.relative_to(REPO)}" if _config.is_relative_to(REPO) else ""})
    # our source last, so editing it rebuilds only these two small layers
    .add_local_dir(str(REPO), "/opt/retool", copy=True,
                   ignore=[".git", ".venv", ".env", "outputs", "**/__pycache__", "data", "checkpoints", ".whl", ".gpu"])
    .run_commands("pip install --no-deps -e /opt/retool")
    .workdir("/opt/retool")
)


def _run(cmds: list[list[str]], env: dict[str, str] | None = None) -> None:
    import shlex

    full_env = {**os.environ, **launcher.logging_env({k: v for k, v in os.environ.items() if k in launcher.SECRET_KEYS}),
                **(env or {})}
    for cmd in cmds:
        print("$ " + launcher.redact(shlex.join(cmd), _secrets_in_env()), flush=True)
        subprocess.run(cmd, check=True, env=full_env)


def _secrets_in_env() -> dict[str, str]:
    return {k: os.environ[k] for k in launcher.SECRET_KEYS if os.environ.get(k)}


def _reload() -> None:
    for volume in VOLUMES.values():
        volume.reload()


def _commit() -> None:
    for volume in VOLUMES.values():
        volume.commit()


def _sandbox_url() -> str:
    if EXP.sandbox.url:
        return EXP.sandbox.url
    fn = modal.Function.from_name(EXP.sandbox.app_name, EXP.sandbox.function)
    return fn.get_web_url()


def _ensure_model(model_id: str) -> str:
    path = launcher.model_dir(model_id)
    if not (Path(path) / "config.json").exists():
        _run([["python", "-m", "recipe.retool.cloud.launcher", "--download", model_id, path]])
        models_volume.commit()
    return path


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, timeout=T.download)
def download_model(model: str = EXP.model) -> str:
    _reload()
    return _ensure_model(model)


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, timeout=T.prep, cpu=16)
def prep_dataset() -> None:
    _reload()
    tokenizer = _ensure_model(EXP.model)
    _run(launcher.prep_commands(EXP, tokenizer))
    _commit()


def _train(stage: str, cmd: list[str], exp_dir: str, base_model: str, env: dict[str, str] | None = None,
           record: bool = True, exp: launcher.Experiment = EXP) -> None:
    """One training run, described before it starts: ``run_info.json`` is written (and committed)
    first, so the steps it saves get its record even if the container is pre-empted; steps left by
    an earlier pre-empted run get that run's record. ``record``: False on the other nodes of a cluster
    (each node still commits the shards it wrote)."""
    if record:
        launcher.start_run(exp_dir, launcher.run_info(exp, stage, cmd, base_model))
        checkpoints_volume.commit()
    try:
        _run([cmd], env=env)
    finally:
        if record:
            launcher.stamp_checkpoints(exp_dir)
        _commit()


def _on_this_node(stage: str, cmd: list[str]) -> tuple[list[str], bool]:
    """The command this container runs, and whether it keeps the run's record: ``cmd`` itself on one
    node; on a cluster, ``cmd`` through recipe.retool.cluster with this container's rank and every
    container's address (rank 0 starts the Ray head or the rendezvous, the others join it)."""
    if EXP.nodes == 1:
        return cmd, True
    node = modal.Cluster.from_context()
    rank = node.container_rank()
    return launcher.node_command(EXP, stage, rank, node.container_ips(family="ipv4"), cmd), rank == 0


def _clustered(fn):
    """One container per node when the experiment has several (each takes all of its host's GPUs)."""
    return modal.clustered(size=EXP.nodes, rdma=EXP.rdma)(fn) if EXP.nodes > 1 else fn


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, gpu=GPU, timeout=T.sft)
@_clustered
def train_sft() -> None:
    _reload()
    model = _ensure_model(EXP.model)
    cmd, record = _on_this_node("sft", launcher.sft_command(EXP, model))
    _train("sft", cmd, launcher.sft_checkpoint_root(EXP), EXP.model, record=record)


def _train_grpo(sft_checkpoint: str | None = None, extra: list[str] | None = None) -> None:
    _reload()
    cmd, record = _on_this_node("grpo", launcher.grpo_command(EXP, sft_checkpoint, extra or []))
    _train("grpo", cmd, launcher.grpo_checkpoint_root(EXP),
           sft_checkpoint or EXP.grpo.sft_checkpoint or launcher.sft_checkpoint_root(EXP),
           env={SANDBOX_URL_ENV: _sandbox_url()}, record=record)


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, gpu=GPU, timeout=T.grpo)
@_clustered
def train_grpo(sft_checkpoint: str = "") -> None:
    _train_grpo(sft_checkpoint or None)


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, gpu=GPU, timeout=T.grpo)
@_clustered
def train_dapo(sft_checkpoint: str = "") -> None:
    """Alias of train_grpo (the RL data is DAPO-Math-17k)."""
    _train_grpo(sft_checkpoint or None)


def _latest_checkpoint() -> str:
    ckpts = launcher.list_checkpoints()
    for stage in ("grpo", "sft"):
        mine = [c for c in ckpts if c["stage"] == stage]
        if mine:
            return max(mine, key=lambda c: c["step"])["path"]
    raise RuntimeError(f"no checkpoints under {launcher.CKPT_DIR}; train first or pass --checkpoint")


def _serve_and_evaluate(checkpoint: str, gpus: int, extra: list[str]) -> None:
    from recipe.retool.processes import stop_process, wait_until_healthy
    from recipe.retool.train import resolve_model

    resolved = resolve_model(checkpoint)
    if resolved.merge_from:
        _run([resolved.merge_command()])
    server = subprocess.Popen(launcher.serve_command(EXP, resolved.path, gpus))
    try:
        # raises (and the evaluation does not run) if the server exits or does not answer 200 in time
        wait_until_healthy(launcher.model_server_url(EXP), EXP.eval.server_start_timeout, server, "model server",
                           interval=2)
        name = Path(checkpoint).name if "global_step" in checkpoint else Path(resolved.path).name
        output = f"{launcher.CKPT_DIR}/eval/{EXP.experiment}/{name}.json"
        _run([launcher.eval_command(EXP, output, _sandbox_url(), extra)])
    finally:
        stop_process(server, grace=60)
    _commit()


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, gpu=GPU, timeout=T.eval)
def evaluate(checkpoint: str = "") -> None:
    _reload()
    _serve_and_evaluate(checkpoint or EXP.eval.checkpoint or _latest_checkpoint(), EXP.gpus, [])


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, timeout=T.sft + T.grpo + T.eval)
def pipeline() -> None:
    """The stages of ``python -m recipe.retool.pipeline``, chained: data and prefilter, SFT, GRPO,
    evaluation (each on its own containers; the merges happen where a stage reads a checkpoint)."""
    prep_dataset.remote()
    train_sft.remote()
    train_grpo.remote()
    evaluate.remote()


@app.function(image=image, volumes=VOLUMES, env=ENV, timeout=300)
def list_checkpoints() -> list[dict]:
    _reload()
    rows = launcher.list_checkpoints()
    for r in rows:
        print(f"{r['stage']:5s} {r['experiment']:30s} step {r['step']:6d} merged={r['merged']} {r['path']}")
    return rows


@app.function(image=image, volumes=VOLUMES, env=ENV, timeout=3600, cpu=8, memory=65536)
def merge_checkpoint(experiment_name: str, step: int, stage: str = "sft") -> str:
    _reload()
    step_dir = Path(launcher.CKPT_DIR) / f"{stage}-experiments" / experiment_name / f"global_step_{step}"
    if not step_dir.is_dir():
        raise FileNotFoundError(f"{step_dir}: no such checkpoint (see list_checkpoints)")
    _run([launcher.merge_command(step_dir)])
    _commit()
    return str(step_dir)


@app.function(image=image, secrets=SECRETS, env=ENV, timeout=300)
def check_sandbox_connection() -> dict:
    import asyncio

    from recipe.retool.sandbox.client import SandboxClient

    url = _sandbox_url()

    async def probe():
        client = SandboxClient(url, max_retries=1, token=os.environ.get(launcher.SANDBOX_TOKEN_ENV))
        try:
            ok = await client.ping()
            res = await client.run_code("import sympy\nprint(sympy.factorint(2024))")
            return {"url": url, "ping": ok, "status": res.status, "stdout": res.stdout,
                    "latency_ms": round(res.latency_s * 1000)}
        finally:
            await client.aclose()

    report = asyncio.run(probe())
    print(report)
    return report


@app.function(image=image, volumes=VOLUMES, secrets=SECRETS, env=ENV, gpu=f"{EXP.gpu}:1", timeout=T.smoke)
def smoke() -> None:
    """The smallest end-to-end run on one GPU: a handful of steps of each stage (see config/experiments/smoke.yaml)."""
    _reload()
    plan = launcher.plan(EXP)["smoke"]["commands"]
    exp = launcher.smoke_experiment(EXP)
    model = _ensure_model(exp.model)
    prep, sft, grpo, evaluation = plan[:-3], plan[-3], plan[-2], plan[-1]
    _run(prep)
    _train("sft", sft, launcher.sft_checkpoint_root(exp), exp.model, exp=exp)
    _train("grpo", grpo, launcher.grpo_checkpoint_root(exp), launcher.sft_checkpoint_root(exp),
           env={SANDBOX_URL_ENV: _sandbox_url()}, exp=exp)
    latest = max((c for c in launcher.list_checkpoints() if c["experiment"] == f"{EXP.experiment}-grpo"),
                 key=lambda c: c["step"], default=None)
    _serve_and_evaluate(latest["path"] if latest else model, 1, [str(a) for a in evaluation[evaluation.index("--data") + 2:]])


@app.function(image=image, volumes=VOLUMES, env=ENV, timeout=300)
def list_models() -> list[str]:
    _reload()
    names = sorted(p.name for p in Path(launcher.MODELS_DIR).iterdir() if (p / "config.json").exists())
    for n in names:
        print(n.replace("--", "/"))
    return names


@app.local_entrypoint()
def dry_run() -> None:
    """Print each function's commands and resources for this experiment config (nothing runs)."""
    sys.exit(launcher.main(["--dry-run", *(["--config", os.environ["RETOOL_MODAL_CONFIG"]]
                                           if os.environ.get("RETOOL_MODAL_CONFIG") else [])]))
