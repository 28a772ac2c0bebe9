"""Build and launch verl's SFT and GRPO trainers from our YAML configs.

    python -m recipe.retool.train sft  MODEL DATA_DIR OUT_DIR [EXP] [key=value ...] [--dry-run]
    python -m recipe.retool.train grpo SFT_MODEL DATA_DIR OUT_DIR [EXP] [key=value ...] [--dry-run]

Hyperparameters live in ``recipe/retool/config/*.yaml`` only; this module adds the paths
(``retool.model_path`` etc.) and passes every trailing ``key=value`` / ``+key=value`` to verl
unchanged. The config is composed with Hydra here first and checked against verl's own schema
(:mod:`recipe.retool.config_check`: keys verl would not read, values of the wrong type, loggers that
are not installed, data files that do not exist), so a mistake fails before any GPU is touched;
``--dry-run`` runs the same checks, then prints the resolved config and the exact command.

For GRPO, SFT_MODEL may be a Hugging Face model (id or directory) or an SFT checkpoint root: the
latest ``global_step_N`` is picked and, when it holds only FSDP shards, merged to Hugging Face
format with verl's model merger (once; the merged copy is reused).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recipe.retool import CONFIG_DIR, PACKAGE_DIR
from recipe.retool.config_check import (
    EXTENSION_KEYS,
    data_problems,
    free_form_at,
    has_path,
    interpolated_paths,
    logger_problems,
    override_problems,
    reward_kwargs_problems,
    type_problems,
)
from recipe.retool.metrics import metrics_path, set_aside
from recipe.retool.perf.attention import cudnn_single_sequence_mode
from recipe.retool.perf.attention import resolve as resolve_attention
from recipe.retool.perf.kernels import padded_triton_problem
from recipe.retool.perf.kernels import resolve as resolve_kernels
from recipe.retool.perf.precision import resolve as resolve_precision
from recipe.retool.settings import SANDBOX_URL_ENV
from recipe.retool.stages import merge_command

STAGES = {
    "sft": ("retool_sft", ["-m", "verl.trainer.sft_trainer"]),
    "grpo": ("retool_grpo_template", ["-m", "verl.trainer.main_ppo"]),
}
# verl's config tree (ppo_trainer, sft_trainer_engine, …) is found through Hydra's search path. It
# is passed as an override rather than written in the YAML, because Hydra only honours
# hydra.searchpath in the primary config and our variants (retool_grpo_upstream) extend others.
# Our own config directory is on it too, so configs kept elsewhere (the miniature's, in
# recipe/retool/dev/config) can extend retool_sft / retool_grpo_template by name.
SEARCHPATH = f"hydra.searchpath=[pkg://verl.trainer.config,file://{CONFIG_DIR}]"
FILE_LOGGER_ENV = "VERL_FILE_LOGGER_PATH"  # where verl's `file` logger writes (verl/utils/tracking.py)
# what environment() sets for the trainer's processes, besides the config's retool.env
RECIPE_ENV = (SANDBOX_URL_ENV, FILE_LOGGER_ENV, "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM", "SWANLAB_MODE", "WANDB_MODE")
STEP_DIR = re.compile(r"^global_step_(\d+)$")
_SHARD = re.compile(r"^model_world_size_\d+_rank_\d+\.pt$")


class CheckpointError(ValueError):
    pass


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR):
    """Compose one of our configs with verl's config tree, exactly as the trainer will."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name=config_name, overrides=[SEARCHPATH, *overrides])


BASE_CONFIG = {"sft_trainer_engine", "ppo_trainer"}


def _leaf_paths(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    if isinstance(node, DictConfig):
        out = []
        for key in node.keys():
            out += _leaf_paths(node._get_node(key), f"{prefix}{key}.")
        return out
    return [prefix[:-1]]


def unknown_keys(config_name: str, config_dir: Path = CONFIG_DIR, base: str | None = None) -> list[str]:
    """Keys set in our YAML (or the YAMLs it extends or mixes in) that verl's base config does not have.

    Hydra merges unknown keys silently and verl's dataclass conversion only covers some sections,
    so a misspelt ``data.max_prompt_lenght`` would otherwise be ignored without a word. A mixin (a
    YAML with no verl base of its own, listed after one that has it) is checked against the base of
    the config that lists it.
    """
    from omegaconf import OmegaConf

    raw = OmegaConf.load(find_config(config_name, config_dir))
    parents = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    base = base or next((d for d in parents if d in BASE_CONFIG), None) or next(
        (found for d in parents if d not in BASE_CONFIG and (found := _base_of(d, config_dir))), None)
    bad: list[str] = []
    for parent in parents:
        if parent not in BASE_CONFIG:
            bad += unknown_keys(parent, config_dir, base)
    if base is None:
        return [f"{config_name}: extends no verl base config ({sorted(BASE_CONFIG)})"]
    reference = compose_verl(base)
    plain = OmegaConf.to_container(reference, resolve=False)
    for path in _leaf_paths(OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "defaults"])):
        if path.startswith(EXTENSION_KEYS):
            continue
        if not _has_path(reference, path) and free_form_at(plain, path) is None:
            bad.append(f"{config_name}.yaml: '{path}' is not a key of verl's {base} config")
    return bad


def find_config(config_name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """A config by name: in ``config_dir`` first, then in the recipe's own config directory."""
    for d in dict.fromkeys((Path(config_dir), CONFIG_DIR)):
        if (d / f"{config_name}.yaml").is_file():
            return d / f"{config_name}.yaml"
    raise FileNotFoundError(f"no config '{config_name}.yaml' in {config_dir} or {CONFIG_DIR}")


def split_config_arg(config: str) -> tuple[str, Path]:
    """``--config NAME`` (a config of recipe/retool/config) or ``--config path/to/NAME.yaml``."""
    if config.endswith((".yaml", ".yml")):
        path = Path(config).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such file")
        return path.stem, path.parent
    return config, CONFIG_DIR


def _has_path(cfg, path: str) -> bool:
    """Whether a dotted key exists (a mandatory ``???`` value counts as existing)."""
    from omegaconf import DictConfig

    node = cfg
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _base_of(config_name: str, config_dir: Path) -> str | None:
    from omegaconf import OmegaConf

    parents = [d for d in OmegaConf.load(find_config(config_name, config_dir)).get("defaults", []) if isinstance(d, str)]
    for parent in parents:
        if parent in BASE_CONFIG:
            return parent
        if parent != "_self_" and (found := _base_of(parent, config_dir)):
            return found
    return None


def yaml_chain(config_name: str, config_dir: Path = CONFIG_DIR) -> list[tuple[str, dict]]:
    """Our YAML files behind a config, the config itself first, each with its own keys (plain dict)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(find_config(config_name, config_dir))
    own = OmegaConf.to_container(OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "defaults"]))
    chain = [(f"{config_name}.yaml", own)]
    for parent in reversed([d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]):
        if parent not in BASE_CONFIG:
            chain += yaml_chain(parent, config_dir)
    return chain


def check_config(config_name: str, config_dir: Path, overrides: Sequence[str], user_overrides: Sequence[str],
                 data_dir: str) -> list[str]:
    """Everything :mod:`recipe.retool.config_check` finds before a launch, one line per problem.

    ``overrides`` is the whole list given to Hydra (paths first); ``user_overrides`` the part the
    user typed, checked for keys verl will not read."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems = unknown_keys(config_name, config_dir)
    if problems:
        return problems
    base = _base_of(config_name, config_dir) or "ppo_trainer"
    reference = OmegaConf.to_container(compose_verl(base), resolve=True)
    user = set(user_overrides)
    paths_only = compose(config_name, [o for o in overrides if o not in user], config_dir)
    problems = override_problems(user_overrides, OmegaConf.to_container(paths_only, resolve=True), reference, base)
    if problems:
        return problems
    try:
        composed = compose(config_name, overrides, config_dir)
        cfg = OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:  # e.g. '+key' on a key that already exists
        return [" ".join(str(exc).split())]
    chain = yaml_chain(config_name, config_dir)

    def origin(path: str) -> str:
        for line in reversed(overrides):
            key = line.split("=", 1)[0].lstrip("+~")
            if path == key or path.startswith(key + "."):
                return f"override '{line}'"
        for name, own in chain:
            if has_path(own, path):
                return name
        return f"verl's {base} config"

    problems = type_problems(cfg, reference, origin, interpolated_paths(composed))
    problems += reward_kwargs_problems(cfg, origin)
    problems += logger_problems(list(cfg["trainer"].get("logger") or []), origin("trainer.logger"))
    return problems + data_problems(cfg, data_dir)


@functools.lru_cache(maxsize=4)
def compose_verl(config_name: str):
    """One of verl's own configs, untouched (the reference our keys are checked against; read-only)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return hydra_compose(config_name=config_name)


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in d.iterdir() if p.is_file()
    )


def latest_step_dir(root: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


@dataclass
class ResolvedModel:
    path: str  # what to give verl as the model path
    merge_from: Path | None = None  # shard dir to merge first, when needed

    def merge_command(self) -> list[str]:
        assert self.merge_from is not None
        return merge_command(self.merge_from, self.path, python=sys.executable)


def resolve_model(path: str) -> ResolvedModel:
    """A HF model id/dir as is; an SFT/GRPO checkpoint root → its latest step, merged if sharded."""
    p = Path(path)
    if not p.exists():
        if path.startswith(("/", "./", "../")) or path.count("/") != 1:
            raise CheckpointError(f"{path}: no such directory (and not a Hugging Face model id like 'org/name')")
        return ResolvedModel(path)  # a hub id, e.g. Qwen/Qwen2.5-7B-Instruct
    if not p.is_dir():
        raise CheckpointError(f"{path}: expected a model directory or a checkpoint root, got a file")
    if _has_weights(p):
        return ResolvedModel(str(p))
    step = p if STEP_DIR.match(p.name) else latest_step_dir(p)
    if step is None:
        raise CheckpointError(f"{path}: neither a Hugging Face model (config.json + weights) "
                              "nor a checkpoint root with global_step_N folders")
    shard_dir = step / "actor" if (step / "actor").is_dir() else step
    for candidate in (shard_dir / "huggingface", shard_dir / "merged_hf"):
        if candidate.is_dir() and _has_weights(candidate):
            return ResolvedModel(str(candidate))
    if not any(_SHARD.match(f.name) for f in shard_dir.iterdir()):
        raise CheckpointError(f"{shard_dir}: no Hugging Face weights and no FSDP shards (model_world_size_*_rank_*.pt)")
    return ResolvedModel(str(shard_dir / "merged_hf"), merge_from=shard_dir)


def path_overrides(model: str, data_dir: str, out_dir: str, experiment: str | None) -> list[str]:
    ov = [f"retool.model_path={model}", f"retool.data_dir={os.path.abspath(data_dir)}",
          f"retool.output_dir={os.path.abspath(out_dir)}"]
    if experiment:
        ov.append(f"trainer.experiment_name={experiment}")
    return ov


def build_command(stage: str, config_name: str, overrides: Sequence[str], cfg,
                  config_dir: Path = CONFIG_DIR) -> list[str]:
    _, module = STAGES[stage]
    args = [*module, f"--config-path={config_dir}", f"--config-name={config_name}", SEARCHPATH, *overrides]
    if stage == "sft":
        nproc = int(cfg.trainer.n_gpus_per_node)
        nnodes = int(cfg.trainer.nnodes)
        # torchrun through this interpreter: a venv's python run without activating the venv has no
        # `torchrun` on PATH (or a different environment's)
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}"]
        if nnodes == 1:
            launcher.append("--standalone")
        else:  # multi-node: the cluster launcher sets NODE_RANK / MASTER_ADDR / MASTER_PORT per node
            launcher += [f"--node_rank={os.environ.get('NODE_RANK', '0')}",
                         f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                         f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
        return [*launcher, *args]
    return [sys.executable, *args]


def environment(cfg, stage: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if stage == "grpo":
        env[SANDBOX_URL_ENV] = str(cfg.retool.sandbox_url)
        # the driver gets the environment the config gives verl's Ray workers (plugins, platform)
        env.update({k: str(v) for k, v in cfg.ray_kwargs.ray_init.runtime_env.get("env_vars", {}).items()})
    # environment a config asks for (the miniature's CPU platform, for one), for every process
    env.update({k: str(v) for k, v in (cfg.retool.get("env") or {}).items()})
    if "file" in list(cfg.trainer.logger) and not env.get(FILE_LOGGER_ENV):
        # verl's file logger writes the per-step metrics beside the run's checkpoints (recipe.retool.metrics)
        env[FILE_LOGGER_ENV] = str(metrics_path(cfg.trainer.default_local_dir))
    if "swanlab" in list(cfg.trainer.logger) and not env.get("SWANLAB_API_KEY"):
        env.setdefault("SWANLAB_MODE", "local")  # no key: log locally rather than fail
    if "wandb" in list(cfg.trainer.logger) and not env.get("WANDB_API_KEY"):
        env.setdefault("WANDB_MODE", "offline")
    return env


def ray_cluster_overrides(cfg, env: Mapping[str, str]) -> list[str]:
    """GRPO on a running Ray cluster (``RAY_ADDRESS`` set, as :mod:`recipe.retool.cluster` does).

    - ``ray.init`` refuses ``num_cpus`` / ``num_gpus`` when it connects to a cluster, whose nodes
      declared their resources when they joined: the config's values (the miniature's logical slots)
      are dropped.
    - The workers are children of each node's ``ray start``, not of this process: the variables
      :func:`environment` decides for them (the sandbox URL, the metrics file, the loggers' modes,
      the config's ``retool.env``) go in Ray's job environment instead. Secrets are not among them:
      they reach the workers from the environment ``ray start`` ran in."""
    if env.get("RAY_ADDRESS") in (None, "", "local"):  # "local": Ray starts a cluster of its own
        return []
    init = cfg.ray_kwargs.get("ray_init") or {}
    out = [f"ray_kwargs.ray_init.{key}=null" for key in ("num_cpus", "num_gpus") if init.get(key) is not None]
    keys = [*RECIPE_ENV, *(cfg.retool.get("env") or {})]
    return out + [f"++ray_kwargs.ray_init.runtime_env.env_vars.{k}={_hydra_quote(env[k])}" for k in sorted(set(keys))
                  if k in env]


def _hydra_quote(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar, read back unchanged: a backslash is
    an escape only before a quote or the closing quote, and ``${`` would start an interpolation."""
    value = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)  # literal: \${, and its backslashes doubled
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def _verl_version() -> str:
    from importlib.metadata import version

    return version("verl")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("model", help="base model (sft) or SFT model / checkpoint root (grpo)")
    p.add_argument("data_dir", help="directory holding sft/train.parquet or rl/{train,aime24}.parquet")
    p.add_argument("out_dir", help="checkpoints go to OUT_DIR/{sft,grpo}-experiments/EXP")
    p.add_argument("rest", nargs="*", help="[EXPERIMENT_NAME] then verl key=value overrides")
    p.add_argument("--config", default=None,
                   help="config name in recipe/retool/config, or a path to a YAML file (default per stage)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and command; run nothing")
    args = p.parse_intermixed_args(argv)  # flags may stand anywhere, as the wrappers document

    experiment = args.rest[0] if args.rest and "=" not in args.rest[0] else None
    user_overrides = args.rest[1:] if experiment else args.rest
    try:
        config_name, config_dir = split_config_arg(args.config or STAGES[args.stage][0])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model = args.model
    merge = None
    if args.stage == "grpo":
        try:
            resolved = resolve_model(args.model)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        model, merge = resolved.path, resolved if resolved.merge_from else None
    overrides = [*path_overrides(model, args.data_dir, args.out_dir, experiment),
                 f"retool.recipe_dir={PACKAGE_DIR}" if args.stage == "grpo" else None, *user_overrides]
    overrides = [o for o in overrides if o]
    from omegaconf import OmegaConf

    problems = check_config(config_name, config_dir, overrides, user_overrides, args.data_dir)
    if problems:
        print(f"error: the {args.stage} config does not pass the pre-launch check "
              f"({config_name}, verl {_verl_version()}):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    try:
        cudnn_single_sequence_mode()  # read by retool_packed in every worker: a bad value fails here, not there
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = compose(config_name, overrides, config_dir)
    attention, attention_overrides = resolve_attention(cfg, args.stage)
    kernels, kernel_overrides = resolve_kernels(cfg, args.stage, user_overrides)
    try:
        precision = resolve_precision(cfg, args.stage)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cluster_overrides = ray_cluster_overrides(cfg, environment(cfg, args.stage)) if args.stage == "grpo" else []
    if attention_overrides or kernel_overrides or precision.overrides or cluster_overrides:
        overrides += attention_overrides + kernel_overrides + precision.overrides + cluster_overrides
        cfg = compose(config_name, overrides, config_dir)
    attention_line = f"attention: {attention.implementation} ({attention.reason})"
    if kernels.problem:
        print(f"error: {kernels.describe()}: {kernels.problem}", file=sys.stderr)
        return 2
    if problem := padded_triton_problem(cfg, args.stage):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if attention.problem and not args.dry_run:
        print(f"error: {attention_line}: {attention.problem}", file=sys.stderr)
        return 2
    cmd = build_command(args.stage, config_name, overrides, cfg, config_dir)
    env = environment(cfg, args.stage)
    if args.dry_run:
        print(f"# {attention_line}" + (f"\n# warning, a launch on this machine is refused: {attention.problem}"
                                       if attention.problem else ""))
        print(f"# {kernels.describe()}")
        if precision.line:
            print(f"# {precision.line}")
        print("# resolved config")
        print(OmegaConf.to_yaml(cfg, resolve=True))
        if merge:
            print("# merge the sharded checkpoint first")
            print(shlex.join(merge.merge_command()))
        print("# command")
        print(shlex.join(cmd))
        return 0
    if merge:
        print(f"merging {merge.merge_from} → {merge.path}", flush=True)
        subprocess.run(merge.merge_command(), check=True)
    print(attention_line, flush=True)
    print(kernels.describe(), flush=True)
    if precision.line:
        print(precision.line, flush=True)
    print(shlex.join(cmd), flush=True)
    if env.get(FILE_LOGGER_ENV) and env.get("NODE_RANK", "0") == "0":  # one node of a cluster keeps the file
        metrics = Path(env[FILE_LOGGER_ENV])
        metrics.parent.mkdir(parents=True, exist_ok=True)
        set_aside(metrics)  # verl truncates it: a resumed run keeps the earlier launches' metrics
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
