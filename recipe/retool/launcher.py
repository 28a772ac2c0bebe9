"""The cloud launcher's plain-Python half: experiment configs, volume names, stage commands,
checkpoint discovery and bookkeeping, secrets from ``.env``. ``modal_app.py`` is a thin shell
around this module, so all of it is testable without Modal's cloud.

    python -m recipe.retool.launcher --dry-run [--config config/modal/default.yaml] [key=value ...]

prints every Modal function's command and resources for the experiment config without running
anything. Config values can be overridden with dotted ``key=value`` arguments (``gpus=4``,
``sft.overrides=[trainer.total_epochs=1]``); ``RETOOL_EXPERIMENTER`` / ``RETOOL_EXPERIMENT``
override the names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "config" / "modal" / "default.yaml"
SECRET_KEYS = ("HF_TOKEN", "WANDB_API_KEY", "SWANLAB_API_KEY", "RETOOL_SANDBOX_TOKEN")
# the bearer token of the sandbox web endpoint: its server requires it, our tool and evaluation send it
SANDBOX_TOKEN_ENV = "RETOOL_SANDBOX_TOKEN"
# image.engine -> the GPU set the image installs (one file per set, also setup.py's extras)
GPU_REQUIREMENTS = {"sglang": "requirements-gpu.txt", "vllm": "requirements-gpu-vllm.txt"}

# where the volumes are mounted inside the containers
DATA_DIR = "/vol/data"
MODELS_DIR = "/vol/models"
CKPT_DIR = "/vol/checkpoints"


@dataclass
class Experiment:
    experimenter: str = "default"
    experiment: str = "retool"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    gpu: str = "H100"
    gpus: int = 8
    nodes: int = 1
    timeouts: dict[str, int] = field(default_factory=lambda: {
        "prep": 3600, "download": 3600, "sft": 24 * 3600, "grpo": 24 * 3600, "eval": 4 * 3600, "smoke": 3600})
    data: dict[str, Any] = field(default_factory=lambda: {
        "sft_source": "JoeYing/ReTool-SFT", "rl_source": "BytedTsinghua-SIA/DAPO-Math-17k",
        "val_source": "Maxwell-Jia/AIME_2024", "sample": False, "prefilter_args": []})
    sft: dict[str, Any] = field(default_factory=lambda: {"config": "retool_sft", "overrides": []})
    grpo: dict[str, Any] = field(default_factory=lambda: {
        "config": "retool_grpo_template", "sft_checkpoint": None, "overrides": []})
    eval: dict[str, Any] = field(default_factory=lambda: {
        "checkpoint": None, "server": "sglang", "served_name": "retool", "port": 8000, "args": []})
    sandbox: dict[str, Any] = field(default_factory=lambda: {
        "url": None, "app_name": "retool-sandbox", "function": "sandbox", "workers": 16, "cpu": 8,
        "memory_mb": 16384, "max_containers": 32, "concurrency": 64, "allow_unsafe": False})
    smoke: dict[str, Any] = field(default_factory=lambda: {"model": "Qwen/Qwen2.5-0.5B-Instruct", "sft_overrides": [],
                                                           "grpo_overrides": [], "eval_args": []})
    image: dict[str, Any] = field(default_factory=lambda: {
        "base": "nvidia/cuda:12.8.1-devel-ubuntu22.04", "python": "3.12", "engine": "sglang", "flash_attn_wheel": None})

    @property
    def gpu_requirements(self) -> Path:
        """The GPU set the image installs: the same file as setup.py's `gpu` / `gpu-vllm` extra."""
        if self.image.get("engine") not in GPU_REQUIREMENTS:
            raise ConfigError(f"image.engine: expected one of {sorted(GPU_REQUIREMENTS)}, got {self.image.get('engine')!r}")
        return REPO_ROOT / "recipe" / "retool" / GPU_REQUIREMENTS[self.image["engine"]]

    @property
    def sft_name(self) -> str:
        return self.experiment

    @property
    def grpo_name(self) -> str:
        return f"{self.experiment}-grpo"


class ConfigError(ValueError):
    pass


def _merge(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {sorted(base)})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` → {"a": {"b": value}}, the value parsed as YAML (numbers, lists, null)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = (),
                    environ: dict[str, str] | None = None) -> Experiment:
    """The experiment config: defaults ← YAML file ← ``key=value`` overrides ← environment names."""
    import yaml

    environ = os.environ if environ is None else environ
    cfg = asdict(Experiment())
    path = Path(path) if path else DEFAULT_CONFIG
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = _merge(cfg, loaded, str(path))
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"{path}: no such experiment config")
    for item in overrides:
        cfg = _merge(cfg, parse_override(item), f"override '{item}'")
    for env, key in (("RETOOL_EXPERIMENTER", "experimenter"), ("RETOOL_EXPERIMENT", "experiment")):
        if environ.get(env):
            cfg[key] = environ[env]
    exp = Experiment(**cfg)
    if exp.gpus < 1 or exp.nodes < 1:
        raise ConfigError(f"{path}: gpus and nodes must be ≥ 1 (got gpus={exp.gpus}, nodes={exp.nodes})")
    return exp


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
    return f"{MODELS_DIR}/{model_id.replace('/', '--')}"


def _py(module: str, *args: str) -> list[str]:
    return ["python", "-m", module, *args]


def prep_commands(exp: Experiment, tokenizer: str | None = None) -> list[list[str]]:
    d = exp.data
    cmd = _py("recipe.retool.data", "all", "--out-dir", f"{DATA_DIR}/raw",
              "--sft-source", d["sft_source"], "--rl-source", d["rl_source"], "--aime24-source", d["val_source"])
    if d.get("sample"):
        cmd = _py("recipe.retool.data", "all", "--out-dir", f"{DATA_DIR}/raw", "--sample")
    cmds = [cmd]
    tok = tokenizer or model_dir(exp.model)
    for rel in ("sft/train.parquet", "rl/train.parquet", "rl/aime24.parquet"):
        cmds.append(_py("recipe.retool.prefilter_dataset", "--input", f"{DATA_DIR}/raw/{rel}",
                        "--output", f"{DATA_DIR}/{rel}", "--tokenizer", tok, *map(str, d.get("prefilter_args", []))))
    return cmds


def resource_overrides(exp: Experiment, gpus: int | None = None) -> list[str]:
    return [f"trainer.n_gpus_per_node={gpus or exp.gpus}", f"trainer.nnodes={exp.nodes}"]


def sft_command(exp: Experiment, model: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    return _py("recipe.retool.train", "sft", model or model_dir(exp.model), DATA_DIR, CKPT_DIR, exp.sft_name,
               "--config", exp.sft["config"], *resource_overrides(exp), *map(str, [*exp.sft["overrides"], *extra]))


def sft_checkpoint_root(exp: Experiment) -> str:
    return f"{CKPT_DIR}/sft-experiments/{exp.sft_name}"


def grpo_command(exp: Experiment, sft_model: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    model = sft_model or exp.grpo.get("sft_checkpoint") or sft_checkpoint_root(exp)
    return _py("recipe.retool.train", "grpo", model, DATA_DIR, CKPT_DIR, exp.grpo_name,
               "--config", exp.grpo["config"], *resource_overrides(exp), *map(str, [*exp.grpo["overrides"], *extra]))


def serve_command(exp: Experiment, model_path: str, gpus: int | None = None) -> list[str]:
    e = exp.eval
    tp = str(gpus or exp.gpus)
    if e["server"] == "vllm":
        return ["vllm", "serve", model_path, "--served-model-name", e["served_name"], "--port", str(e["port"]),
                "--tensor-parallel-size", tp, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if e["server"] == "sglang":
        return _py("sglang.launch_server", "--model-path", model_path, "--served-model-name", e["served_name"],
                   "--port", str(e["port"]), "--tp", tp, "--tool-call-parser", "qwen25")
    raise ConfigError(f"eval.server: expected 'sglang' or 'vllm', got {e['server']!r}")


def eval_command(exp: Experiment, output: str, sandbox_url: str, extra: Sequence[str] = ()) -> list[str]:
    e = exp.eval
    return _py("recipe.retool.eval_aime24_standalone", "--model", e["served_name"], "--output", output,
               "--base-url", f"http://127.0.0.1:{e['port']}/v1", "--sandbox-url", sandbox_url,
               "--data", f"{DATA_DIR}/rl/aime24.parquet", *map(str, [*e["args"], *extra]))


def merge_command(step_dir: Path) -> list[str]:
    shard_dir = step_dir / "actor" if (step_dir / "actor").is_dir() else step_dir
    return _py("verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(shard_dir),
               "--target_dir", str(shard_dir / "merged_hf"))


def list_checkpoints(root: str | Path = CKPT_DIR) -> list[dict[str, Any]]:
    """Every ``global_step_N`` under ``{sft,grpo}-experiments/<exp>/``, with its info file if any."""
    from recipe.retool.train import STEP_DIR

    out = []
    root = Path(root)
    for stage_dir in sorted(root.glob("*-experiments")):
        for exp_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
            for step_dir in sorted((p for p in exp_dir.iterdir() if STEP_DIR.match(p.name)),
                                   key=lambda p: int(p.name.split("_")[-1])):
                info_path = step_dir / "checkpoint_info.json"
                info = json.loads(info_path.read_text()) if info_path.exists() else {}
                out.append({"stage": stage_dir.name.split("-")[0], "experiment": exp_dir.name,
                            "step": int(step_dir.name.split("_")[-1]), "path": str(step_dir),
                            "merged": (step_dir / "merged_hf").exists() or (step_dir / "actor" / "merged_hf").exists(),
                            **({"info": info} if info else {})})
    return out


def config_hash(config_name: str, overrides: Sequence[str]) -> str:
    """Hash of the recipe YAMLs plus the overrides: two runs with the same hash ran the same config."""
    from recipe.retool import CONFIG_DIR

    h = hashlib.sha256()
    for f in sorted(CONFIG_DIR.rglob("*.yaml")):
        h.update(f.name.encode() + f.read_bytes())
    h.update(json.dumps([config_name, *overrides]).encode())
    return h.hexdigest()[:16]


def write_checkpoint_info(exp_dir: str | Path, stage: str, base_model: str, data: str, config_name: str,
                          overrides: Sequence[str]) -> list[Path]:
    """Describe each new ``global_step_N`` of a run (stage, step, base model, data, config hash, time)."""
    from recipe.retool.train import STEP_DIR

    written = []
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return written
    digest = config_hash(config_name, overrides)
    for step_dir in exp_dir.iterdir():
        m = STEP_DIR.match(step_dir.name)
        info = step_dir / "checkpoint_info.json"
        if not m or info.exists():
            continue
        info.write_text(json.dumps({
            "stage": stage, "step": int(m.group(1)), "base_model": base_model, "data": data,
            "config": config_name, "overrides": list(overrides), "config_hash": digest,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
        written.append(info)
    return written


def load_env(path: str | Path = ".env") -> dict[str, str]:
    """The known secrets from a local ``.env`` (missing file → {}); other keys are ignored."""
    from dotenv import dotenv_values

    path = Path(path)
    if not path.exists():
        return {}
    values = dotenv_values(path)
    return {k: v for k, v in values.items() if k in SECRET_KEYS and v}


def logging_env(secrets: dict[str, str]) -> dict[str, str]:
    """Offline/local logging modes for the loggers whose key is absent."""
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


def plan(exp: Experiment) -> dict[str, dict[str, Any]]:
    """Every Modal function: its commands and resources (what ``--dry-run`` prints)."""
    gpu = f"{exp.gpu}:{exp.gpus}"
    t = exp.timeouts
    sandbox_url = exp.sandbox["url"] or f"<deployed {exp.sandbox['app_name']} URL>"
    eval_out = f"{CKPT_DIR}/eval/{exp.experiment}/<checkpoint>.json"
    smoke_exp = Experiment(**{**asdict(exp), "gpus": 1, "model": exp.smoke["model"],
                              "data": {**exp.data, "sample": True}})
    return {
        "prep_dataset": {"gpu": None, "timeout": t["prep"], "commands": prep_commands(exp)},
        "download_model": {"gpu": None, "timeout": t["download"],
                           "commands": [_py("recipe.retool.launcher", "--download", exp.model, model_dir(exp.model))]},
        "train": {"gpu": gpu, "nodes": exp.nodes, "timeout": t["sft"], "commands": [sft_command(exp)]},
        "train_grpo": {"gpu": gpu, "timeout": t["grpo"], "commands": [grpo_command(exp)],
                       "env": {"RETOOL_SANDBOX_URL": sandbox_url}},
        "evaluate": {"gpu": gpu, "timeout": t["eval"],
                     "commands": [serve_command(exp, "<checkpoint>/merged_hf"), eval_command(exp, eval_out, sandbox_url)]},
        "pipeline": {"gpu": None, "timeout": t["sft"] + t["grpo"] + t["eval"],
                     "commands": [["train"], ["train_grpo"], ["evaluate"]]},
        "list_checkpoints": {"gpu": None, "timeout": 300, "commands": []},
        "merge_checkpoint": {"gpu": None, "timeout": 3600,
                             "commands": [merge_command(Path(f"{CKPT_DIR}/<stage>-experiments/<exp>/global_step_<N>"))]},
        "check_sandbox_connection": {"gpu": None, "timeout": 300, "commands": [], "sandbox_url": sandbox_url},
        "smoke": {"gpu": f"{exp.gpu}:1", "timeout": t["smoke"], "commands": [
            *prep_commands(smoke_exp),
            sft_command(smoke_exp, model_dir(smoke_exp.model), smoke_exp.smoke["sft_overrides"]),
            grpo_command(smoke_exp, None, smoke_exp.smoke["grpo_overrides"]),
            eval_command(smoke_exp, f"{CKPT_DIR}/eval/smoke.json", sandbox_url, smoke_exp.smoke["eval_args"])]},
        "list_models": {"gpu": None, "timeout": 300, "commands": []},
    }


def download(model_id: str, dest: str) -> str:
    """Snapshot a hub model into the models volume (resumes partial downloads)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(model_id, local_dir=dest, token=os.environ.get("HF_TOKEN") or None)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.launcher", description=__doc__,
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
        print(f"error: {err}")
        return 2
    print(f"experiment {exp.experimenter}/{exp.experiment}; volumes {volume_names(exp)}")
    for name, item in plan(exp).items():
        res = {k: v for k, v in item.items() if k != "commands"}
        print(f"\n[{name}] {json.dumps(res)}")
        for cmd in item["commands"]:
            print("  $ " + shlex.join(cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
