"""Pre-launch checks of a composed training config against verl 0.9.1's own schema.

Hydra merges whatever it is given: a misspelt ``+key`` is added silently, and ``rollout.n=four``
composes fine and fails (or worse, does not) hours later on a GPU. ``python -m recipe.retool.train``
runs these checks before it prints or launches anything:

- **override keys**: ``key=value`` must name a key of the composed config, and ``+key=value`` a key
  of verl's base config (or one of the extension points verl passes through unread, see
  :data:`EXTENSION_KEYS`); otherwise verl would never read it;
- **value types**: every value is checked against the type verl declares for it: the field's
  annotation in verl's config dataclass where the section has one (``_target_:
  verl.workers.config.RolloutConfig`` and so on, the classes verl converts the section into), and
  otherwise the type of verl's own default in its YAML (``data.train_batch_size: 1024`` is an
  integer), which is all the schema verl has for ``data`` and ``trainer``;
- **loggers**: every name in ``trainer.logger`` must be a backend verl's ``Tracking`` knows, and
  its package installed (verl imports it when training starts, after minutes of set-up).

Each problem is one line naming where the value came from (the override, or the YAML file).

Why value by value rather than verl's whole-section conversion (``omega_conf_to_dataclass``): verl
0.9.1's own YAML does not convert cleanly into its dataclasses (``null`` for ``int`` fields, keys the
classes lack, ``__post_init__`` checks that need a model), so converting a section reports verl's
inconsistencies along with ours. Each value is checked against its field's type with OmegaConf's
own conversion rules, which are the rules the conversion applies when verl runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Keys verl passes on without reading them itself (everything else must exist in verl's schema):
# our own ``retool`` block, the reward function's keyword arguments, ray.init()'s keyword arguments
# and the Hugging Face model-config overrides (their schemas are ours, Ray's and transformers').
# Of these, ours are checked here too: a ``retool.`` key must be one our YAML defines (``retool.env.``
# is free-form: environment variables), and a reward keyword must be a parameter of the reward function.
EXTENSION_KEYS = ("retool.", "reward.custom_reward_function.reward_kwargs.", "ray_kwargs.ray_init.",
                  "model.override_config.", "actor_rollout_ref.model.override_config.")
OWN_BLOCK, FREE_FORM_OWN = "retool.", ("retool.env.",)
REWARD_KWARGS = "reward.custom_reward_function.reward_kwargs"
# what verl itself passes to the reward function; reward_kwargs come on top
REWARD_CALL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")

# Fields verl's YAML leaves null and no config dataclass types, whose readers use them as integers
# (verl 0.9.1: the trainers compare, count and slice with them), so a default cannot tell their type.
NULL_DEFAULT_TYPES: dict[str, type] = {
    "data.gen_batch_size": int, "data.val_batch_size": int, "data.seed": int,
    "trainer.total_training_steps": int, "trainer.max_actor_ckpt_to_keep": int,
    "trainer.max_critic_ckpt_to_keep": int, "trainer.max_ckpt_to_keep": int,
}

# trainer.logger backend → the package verl imports for it at start-up (None: part of verl itself)
LOGGER_MODULES: dict[str, str | None] = {
    "console": None, "file": None, "wandb": "wandb", "tracking": "wandb", "swanlab": "swanlab",
    "mlflow": "mlflow", "tensorboard": "tensorboard", "clearml": "clearml", "trackio": "trackio",
    "vemlp_wandb": "volcengine_ml_platform", "rl_insight": "rl_insight",
}

_MISSING = "???"


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a (resolved, plain) config tree."""
    if isinstance(node, dict):
        out: list[str] = []
        for key, child in node.items():
            out += leaf_paths(child, f"{prefix}{key}.")
        return out
    return [prefix[:-1]]


def has_path(tree: Any, path: str) -> bool:
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def free_form_at(reference: dict, path: str) -> str | None:
    """The ancestor of ``path`` that verl declares as a free-form mapping (a dataclass field typed
    ``dict``, such as ``fsdp_config.mixed_precision``, null in verl's YAML): keys beneath it are
    read by verl (or handed on) without a schema, so any key may be added there (or the mapping itself
    set, to null included). None if none."""
    node: Any = reference
    cls: type | None = None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return None
        cls = _dataclass(node.get("_target_")) or cls
        hints = _field_types(cls) if cls else {}
        if part in hints and _kind(hints[part]) is dict:
            return ".".join(parts[: i + 1])
        if i == len(parts) - 1:
            return None
        annotation = hints.get(part)
        kind = _kind(annotation) if annotation is not None else None
        cls = kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None
        if part not in node:
            return None
        node = node[part]
    return None


def known_path(reference: dict, path: str) -> bool:
    """Whether verl reads ``path``: a key of its base config, or beneath a free-form mapping."""
    return has_path(reference, path) or free_form_at(reference, path) is not None


def _close(path: str, reference: dict) -> str:
    matches = difflib.get_close_matches(path, leaf_paths(reference), n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


def override_problems(overrides: Sequence[str], composed: dict, reference: dict, base: str) -> list[str]:
    """Overrides naming keys verl will not read. ``composed``: our config without these overrides;
    ``reference``: verl's base config ``base``; both as resolved plain dicts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    problems = []
    for line in overrides:
        try:
            [override] = parser.parse_overrides([line])
        except Exception as exc:  # Hydra's own grammar error, first line only
            problems.append(f"override '{line}': {str(exc).splitlines()[0]}")
            continue
        key = override.key_or_group
        if override.package is not None or "/" in key or override.is_delete():
            continue  # config-group choices and deletions: Hydra checks them itself
        if key.startswith(OWN_BLOCK) and not key.startswith(FREE_FORM_OWN) and not has_path(composed, key):
            own = {"retool": composed.get("retool") or {}}
            problems.append(f"override '{line}': '{key}' is not a key of the recipe's retool block (keys: "
                            f"{', '.join(leaf_paths(own))}){_close(key, own)}")
            continue
        if key.startswith(EXTENSION_KEYS):
            continue
        if override.is_add() or override.is_force_add():
            if not known_path(reference, key):
                problems.append(f"override '{line}': '{key}' is not a key of verl's {base} config, so verl "
                                f"would never read it{_close(key, reference)}")
        elif not has_path(composed, key):
            problems.append(f"override '{line}': '{key}' is not a key of verl's {base} config"
                            f"{_close(key, reference)}")
    return problems


def _dataclass(target: Any) -> type | None:
    if not isinstance(target, str) or "." not in target:
        return None
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    return cls if dataclasses.is_dataclass(cls) else None


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation verl's module cannot resolve at run time: use the raw ones
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _kind(annotation: Any) -> Any:
    """int / float / bool / list / dict / a dataclass, or None when the annotation says too little."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else None
    if annotation in (int, float, bool):
        return annotation
    if annotation in (list, tuple) or origin in (list, tuple, Sequence):
        return list
    if annotation is dict or origin is dict:
        return dict
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    return None


def _default_kind(default: Any) -> Any:
    for kind in (bool, int, float, list, dict):  # bool first: True is an int too
        if isinstance(default, kind):
            return kind
    return None  # a string or null default says nothing about the type


_WORDS = {int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "a mapping"}


def _fits(value: Any, kind: Any, converts: bool) -> bool:
    """Whether ``value`` is acceptable where verl wants ``kind``. ``converts``: the section goes
    through OmegaConf's dataclass conversion, which turns '4' into 4 (so the same rules apply here)."""
    if kind is list:
        return isinstance(value, list)
    if kind is dict:
        return isinstance(value, dict)
    if isinstance(value, (list, dict)):
        return False
    if converts:
        from omegaconf import ValidationError
        from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

        node = {int: IntegerNode, float: FloatNode, bool: BooleanNode}[kind]
        try:
            node(value)
        except ValidationError:
            return False
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # float


def interpolated_paths(cfg: Any, prefix: str = "") -> set[str]:
    """Paths of a DictConfig whose value is an interpolation (``${...}``): such a value is checked
    where it comes from, not once more wherever verl repeats it."""
    from omegaconf import DictConfig, OmegaConf

    out: set[str] = set()
    for key in cfg.keys():
        if OmegaConf.is_interpolation(cfg, key):
            out.add(f"{prefix}{key}")
        elif isinstance(child := cfg._get_node(key), DictConfig):
            out |= interpolated_paths(child, f"{prefix}{key}.")
    return out


def type_problems(config: dict, reference: dict, origin: Callable[[str], str],
                  skip: set[str] = frozenset()) -> list[str]:
    """Values whose type is not what verl declares. ``config`` and ``reference`` (verl's base
    config) are resolved plain dicts; ``origin(path)`` names where a value was set; paths in
    ``skip`` (interpolations, see :func:`interpolated_paths`) are not checked."""
    problems: list[str] = []

    def walk(node: dict, ref: Any, cls: type | None, prefix: str) -> None:
        cls = _dataclass(node.get("_target_")) or cls
        hints = _field_types(cls) if cls else {}
        for key, value in node.items():
            if key == "_target_":
                continue
            path = f"{prefix}{key}"
            child_ref = ref.get(key) if isinstance(ref, dict) else None
            kind = _kind(hints[key]) if key in hints else None
            if isinstance(value, dict):
                sub = kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None
                walk(value, child_ref, sub, path + ".")
                continue
            if value is None or value == _MISSING or path in skip:
                continue  # verl's own YAML leaves typed fields null; "???" is checked by verl
            if kind is None and path in NULL_DEFAULT_TYPES:
                kind = NULL_DEFAULT_TYPES[path]
                if not _fits(value, kind, converts=False):
                    problems.append(f"{origin(path)}: '{path}' expects {_WORDS[kind]} (verl reads it as one; its "
                                    f"default is null), got {value!r}")
                continue
            if kind in _WORDS:
                if not _fits(value, kind, converts=True):
                    where = f"{cls.__module__}.{cls.__qualname__}.{key}"
                    problems.append(f"{origin(path)}: '{path}' expects {_WORDS[kind]} ({where}), got {value!r}")
            elif (default_kind := _default_kind(child_ref)) is not None and not _fits(value, default_kind, converts=False):
                problems.append(f"{origin(path)}: '{path}' expects {_WORDS[default_kind]} (verl's default is "
                                f"{child_ref!r}), got {value!r}")

    walk(config, reference, None, "")
    return problems


def function_parameters(path: str, name: str) -> list[str] | None:
    """Named parameters of function ``name`` in the Python file ``path``, read from its source
    (not imported); None when the file or the function cannot be read."""
    import ast

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            a = node.args
            return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return None


def reward_kwargs_problems(config: dict, origin: Callable[[str], str]) -> list[str]:
    """``reward_kwargs`` the configured reward function has no parameter for. verl passes them as
    keyword arguments; a function that also takes ``**kwargs`` (ours does, for verl's own extra
    arguments) would swallow a misspelt one silently."""
    fn = (config.get("reward") or {}).get("custom_reward_function") or {}
    kwargs, path, name = fn.get("reward_kwargs") or {}, fn.get("path"), fn.get("name") or "compute_score"
    if not kwargs or not path:
        return []
    params = function_parameters(path, name)
    if params is None:
        return []  # a missing file or function is verl's own start-up error, not guessed at here
    own = [p for p in params if p not in REWARD_CALL_ARGS]
    problems = []
    for key in kwargs:
        if key not in own:
            matches = difflib.get_close_matches(key, own, n=1, cutoff=0.6)
            problems.append(f"{origin(f'{REWARD_KWARGS}.{key}')}: reward keyword '{key}' is not a parameter of "
                            f"{name} in {path} (it takes: {', '.join(own)})"
                            + (f"; did you mean '{matches[0]}'?" if matches else ""))
    return problems


def logger_problems(loggers: Sequence[str], where: str) -> list[str]:
    """Backends in ``trainer.logger`` that verl does not know, or whose package is not installed."""
    from verl.utils.tracking import Tracking

    problems = []
    for name in loggers:
        if name not in Tracking.supported_backend and name != "tracking":
            problems.append(f"{where}: trainer.logger names '{name}', which verl does not know "
                            f"(known: {', '.join(Tracking.supported_backend)})")
            continue
        module = LOGGER_MODULES.get(name)
        if module and importlib.util.find_spec(module) is None:
            problems.append(f"{where}: trainer.logger names '{name}', but the '{module}' package is not installed "
                            f"and verl imports it when training starts (pip install {module}, or "
                            f"trainer.logger=[console])")
    return problems


def data_problems(config: dict, data_dir: str) -> list[str]:
    """Local data files the config names that do not exist (``data.train_files`` / ``val_files``)."""
    problems = []
    for key in ("train_files", "val_files"):
        value = config.get("data", {}).get(key)
        for path in [value] if isinstance(value, str) else list(value or []):
            if "://" in str(path) or Path(path).exists():
                continue
            if not Path(data_dir).is_dir():
                problems.append(f"DATA_DIR '{data_dir}' does not exist (data.{key} is {path}); prepare it with "
                                f"`python -m recipe.retool.data all --out-dir {data_dir}` and the prefilter")
                return problems
            problems.append(f"data.{key}: {path} does not exist (DATA_DIR '{data_dir}' does not hold it)")
    return problems
