"""An experiment's stage commands wherever it runs: this node's directories or Modal's volumes.

:func:`commands` turns an experiment config (``config/experiments/*.yaml``, the schema in
:class:`Experiment`) and a :class:`Layout` into every stage's command line, through the builders of
:mod:`recipe.retool.stages`. The production pipeline (:mod:`recipe.retool.pipeline`) runs them on one
node; the cloud plan (:mod:`recipe.retool.cloud.launcher`) gives them to the Modal functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from omegaconf.nodes import EnumNode

from recipe.retool import REPO_ROOT
from recipe.retool.settings import MODEL_SERVER_PORT
from recipe.retool.stages import (
    DATA_FILES,
    VAL_FILE,
    data_command,
    eval_command,
    merge_command,
    prefilter_commands,
    run_dir,
    serve_command,
    train_command,
)

DEFAULT_CONFIG = REPO_ROOT / "config" / "experiments" / "default.yaml"
# local environment variables that name the experiment: they override the file, and are forwarded
# into the containers so that paths computed there agree with the volumes named here
FORWARDED_ENV = {"RETOOL_EXPERIMENTER": "experimenter", "RETOOL_EXPERIMENT": "experiment"}
GPU_EXTRAS = {"sglang": "gpu", "vllm": "gpu-vllm"}  # image.engine -> pyproject's extra


class Engine(str, Enum):
    """The rollout engine the Modal image installs (``image.engine``)."""

    sglang = "sglang"
    vllm = "vllm"


class ModelServer(str, Enum):
    """What serves the checkpoint for evaluation (``eval.server``)."""

    sglang = "sglang"
    vllm = "vllm"


# The experiment config's schema: OmegaConf structured configs, so types, defaults, unknown-key errors
# and merging (defaults ← YAML file ← key=value overrides) come from one place.
@dataclass
class Timeouts:
    """Seconds each Modal function may run."""

    prep: int = 3600
    download: int = 3600
    sft: int = 24 * 3600
    grpo: int = 24 * 3600
    eval: int = 4 * 3600
    smoke: int = 3600


@dataclass
class DataSources:
    sft_source: str = "JoeYing/ReTool-SFT"
    rl_source: str = "BytedTsinghua-SIA/DAPO-Math-17k"
    val_source: str = "Maxwell-Jia/AIME_2024"
    sample: bool = False  # the bundled samples instead of the hub datasets
    prefilter_args: list[str] = field(default_factory=list)


@dataclass
class SftStage:
    config: str = "retool_sft"
    overrides: list[str] = field(default_factory=list)  # verl key=value


@dataclass
class GrpoStage:
    config: str = "retool_grpo_template"
    sft_checkpoint: str | None = None  # None: the latest checkpoint of this experiment's SFT run
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalStage:
    checkpoint: str | None = None  # None: the latest GRPO checkpoint (else SFT)
    server: ModelServer = ModelServer.sglang
    served_name: str = "retool"
    port: int = MODEL_SERVER_PORT
    args: list[str] = field(default_factory=list)  # eval flags, e.g. [--samples, 32]
    # what the one-node pipeline evaluates, in order: base (the hub model), sft, grpo (their merged runs)
    models: list[str] = field(default_factory=lambda: ["sft", "grpo"])
    server_start_timeout: int = 1800  # seconds the model server may take to answer


@dataclass
class SandboxSettings:
    url: str | None = None  # None: the URL of the deployed sandbox app
    # Modal secret-store names for the sandbox app (modal_sandbox.py), before RETOOL_SANDBOX_TOKEN from
    # .env: keep them to a secret holding only the token, since the sandbox runs model-written code
    secrets: list[str] = field(default_factory=list)
    app_name: str = "retool-sandbox"
    function: str = "sandbox"
    workers: int = 16
    cpu: float = 8
    memory_mb: int = 16384
    max_containers: int = 32
    concurrency: int = 64
    allow_unsafe: bool = False


@dataclass
class SmokeRun:
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    sft_overrides: list[str] = field(default_factory=list)
    grpo_overrides: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)


@dataclass
class ImageSettings:
    # CUDA 13 devel: both GPU sets use PyPI's torch 2.11.0 (a CUDA 13.0 build), and flashinfer compiles its
    # kernels at first use with the image's nvcc, which torch refuses when its major version differs
    base: str = "nvidia/cuda:13.0.1-devel-ubuntu22.04"
    python: str = "3.12"
    engine: Engine = Engine.sglang
    flash_attn_wheel: str | None = None


@dataclass
class Experiment:
    experimenter: str = "default"
    experiment: str = "retool"
    model: str = "Qwen/Qwen2.5-7B-Instruct"
    gpu: str = "H100"
    gpus: int = 8
    nodes: int = 1
    # several nodes on Modal: ask for its RDMA network between them (the FSDP collectives cross it)
    rdma: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    data: DataSources = field(default_factory=DataSources)
    sft: SftStage = field(default_factory=SftStage)
    grpo: GrpoStage = field(default_factory=GrpoStage)
    eval: EvalStage = field(default_factory=EvalStage)
    sandbox: SandboxSettings = field(default_factory=SandboxSettings)
    smoke: SmokeRun = field(default_factory=SmokeRun)
    image: ImageSettings = field(default_factory=ImageSettings)
    # Named secrets of Modal's secret store (`modal secret create NAME KEY=value …`) for every function
    # that gets secrets, in this order, then the keys of the local .env: on a key set twice the later
    # source wins (Modal applies a function's secrets in order), so .env overrides the store
    secrets: list[str] = field(default_factory=list)

    @property
    def gpu_extra(self) -> str:
        """The pyproject extra with the GPU set the image installs (`gpu` for SGLang, `gpu-vllm` for vLLM)."""
        return GPU_EXTRAS[self.image.engine.value]

    @property
    def sft_name(self) -> str:
        return self.experiment

    @property
    def grpo_name(self) -> str:
        return f"{self.experiment}-grpo"


class ConfigError(ValueError):
    pass


_WORDS = {"IntegerNode": "an integer", "FloatNode": "a number", "BooleanNode": "true or false",
          "StringNode": "a string", "ListConfig": "a list", "DictConfig": "a mapping"}


def _expected(schema: DictConfig, key: str) -> str:
    node: Any = schema
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return "another value"
        node = node._get_node(part)
    if isinstance(node, EnumNode):
        return f"one of {[e.name for e in node._metadata.object_type]}"
    return _WORDS.get(type(node).__name__, "another value")


def _merge(cfg: DictConfig, update: DictConfig, where: str) -> DictConfig:
    """``cfg`` with ``update`` merged in; a wrong key or type is a ConfigError naming ``where``."""
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as exc:
        parent = exc.full_key.rpartition(".")[0]
        known = list(OmegaConf.select(cfg, parent).keys()) if parent else list(cfg.keys())
        raise ConfigError(f"{where}: unknown key '{exc.full_key}' (known{' in ' + parent if parent else ''}: "
                          f"{', '.join(known)})") from None
    except ValidationError as exc:
        key = exc.full_key or next((k for k in _set_keys(update) if isinstance(OmegaConf.select(cfg, k), DictConfig)), "")
        got = OmegaConf.select(update, key, default=None) if key else update
        if key and isinstance(OmegaConf.select(cfg, key), DictConfig):
            raise ConfigError(f"{where}: '{key}' is a section ({', '.join(OmegaConf.select(cfg, key).keys())}), "
                              f"not a single value") from None
        if not key:
            raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
        raise ConfigError(f"{where}: '{key}' expects {_expected(cfg, key)}, got {got!r}") from None


def _set_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        return [k for key in node.keys() for k in _set_keys(node._get_node(key), f"{prefix}{key}.")]
    return [prefix[:-1]]


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = (),
                    environ: Mapping[str, str] | None = None) -> Experiment:
    """The experiment config: defaults ← YAML file ← ``key=value`` overrides ← environment names.

    Every error names its source: the YAML file for a value set there, the override for one given
    on the command line."""
    environ = os.environ if environ is None else environ
    cfg = OmegaConf.structured(Experiment)
    origin: dict[str, str] = {}
    path = Path(path) if path else DEFAULT_CONFIG
    if path.exists():
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = _merge(cfg, loaded, str(path))
        origin.update(dict.fromkeys(_set_keys(loaded), str(path)))
    elif path != DEFAULT_CONFIG:
        raise ConfigError(f"{path}: no such experiment config")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value")
        try:
            update = OmegaConf.from_dotlist([item])
        except Exception as exc:  # OmegaConf's grammar error, first line only
            raise ConfigError(f"override '{item}': {str(exc).splitlines()[0]}") from None
        cfg = _merge(cfg, update, f"override '{item}'")
        origin.update(dict.fromkeys(_set_keys(update), f"override '{item}'"))
    for env, key in FORWARDED_ENV.items():
        if environ.get(env):
            cfg[key] = environ[env]
            origin[key] = f"${env}"
    for key in ("gpus", "nodes"):
        if cfg[key] < 1:
            raise ConfigError(f"{origin.get(key, 'default')}: '{key}' must be ≥ 1, got {cfg[key]}")
    return OmegaConf.to_object(cfg)


@dataclass(frozen=True)
class Layout:
    """Where a run keeps its files: ``data`` (``raw/`` inside it: the data stage's output, before the
    prefilter), ``checkpoints`` (runs, merged models, ``eval/``), ``models`` (downloaded base models;
    None: verl and the servers read hub ids themselves)."""

    data: str
    checkpoints: str
    models: str | None = None

    @property
    def raw(self) -> str:
        return f"{self.data}/raw"

    @property
    def eval_dir(self) -> str:
        return f"{self.checkpoints}/eval"

    def model_dir(self, model_id: str) -> str:
        return f"{self.models}/{model_id.replace('/', '--')}" if self.models else model_id


def resource_overrides(exp: Experiment, gpus: int | None = None) -> list[str]:
    return [f"trainer.n_gpus_per_node={gpus or exp.gpus}", f"trainer.nnodes={exp.nodes}"]


def commands(exp: Experiment, layout: Layout, python: str = "python", tokenizer: str | None = None,
             sft_model: str | None = None) -> dict[str, Any]:
    """Every stage's command for ``exp`` laid out as ``layout``: ``data``, ``prefilter`` (one per file of
    ``data_files``), ``sft``, ``grpo`` and their run directories ``sft_root`` / ``grpo_root``, and the
    builders ``merge(shard_dir, target)``, ``serve(model_path, gpus)``, ``eval(output, sandbox_url)``."""
    d = exp.data
    sources = None if d.sample else {"sft": d.sft_source, "rl": d.rl_source, "val": d.val_source}
    base = layout.model_dir(exp.model)
    sft_over = [*resource_overrides(exp), *exp.sft.overrides]
    grpo_over = [*resource_overrides(exp), *exp.grpo.overrides]
    sft_root = run_dir(layout.checkpoints, "sft", exp.sft_name)
    e = exp.eval
    return {
        "data_files": list(DATA_FILES),
        "data": data_command(layout.raw, sources, python),
        "prefilter": prefilter_commands(layout.raw, layout.data, tokenizer or base,
                                        {"sft": (exp.sft.config, sft_over), "grpo": (exp.grpo.config, grpo_over)},
                                        d.prefilter_args, python),
        "sft": train_command("sft", sft_model or base, layout.data, layout.checkpoints, exp.sft_name, exp.sft.config,
                             sft_over, python),
        "sft_root": sft_root,
        "grpo": train_command("grpo", exp.grpo.sft_checkpoint or sft_root, layout.data, layout.checkpoints,
                              exp.grpo_name, exp.grpo.config, grpo_over, python),
        "grpo_root": run_dir(layout.checkpoints, "grpo", exp.grpo_name),
        "merge": lambda shard_dir, target=None: merge_command(shard_dir, target, python),
        "serve": lambda model_path, gpus: serve_command(e.server.value, model_path, e.served_name, e.port, gpus, python),
        # evaluate as the GRPO run validates: its config and overrides give sampling and budgets
        "eval": lambda output, sandbox_url, extra=(): eval_command(
            e.served_name, output, f"http://127.0.0.1:{e.port}/v1", sandbox_url, f"{layout.data}/{VAL_FILE}",
            [*grpo_config_args(exp), *e.args, *extra], python),
    }


def grpo_config_args(exp: Experiment) -> list[str]:
    """``--config`` and ``--config-override`` flags: the evaluation reads the GRPO run's settings."""
    return ["--config", exp.grpo.config, *(a for o in exp.grpo.overrides for a in ("--config-override", o))]
