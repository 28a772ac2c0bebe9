"""A CPU "accelerator" for verl's platform registry, so its trainers run on a machine with no GPU.

For development and CI only (with the ``hf_dev`` rollout backend, ``recipe.retool.dev.hf_rollout``):
the miniature GRPO loop of ``dev/config/retool_grpo_debug_cpu.yaml`` runs verl's real ``main_ppo`` with a
tiny model on CPU. Selected by ``VERL_PLATFORM=cpu`` with this module imported in every verl
process (``VERL_USE_EXTERNAL_MODULES=recipe.retool.dev.cpu_platform``); nothing changes otherwise.

What it maps: device ``cpu``, collectives over ``gloo``, Ray's ``GPU`` resource kept as a logical
slot per trainer rank (verl counts GPUs in the cluster before it starts; declare them with
``ray_kwargs.ray_init.num_gpus``, Ray accepts that without a GPU), and a stand-in for
``torch.cuda`` whose memory and stream calls are no-ops. ``current_device()`` returns ``"cpu"``
(not an index) because verl moves tensors with ``.to(get_device_id())``.
verl registers its FSDP engine for ``cuda``/``npu`` only; ``VERL_ENGINE_DEVICE=cuda`` (verl's own
override) makes it pick that engine, which then runs on whatever device this platform names.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Any

import psutil
import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


def _noop(*_args, **_kwargs) -> None:
    return None


def _zero(*_args, **_kwargs) -> int:
    return 0


class _Stream:
    def __init__(self, *_args, **_kwargs): ...
    def synchronize(self): ...
    def wait_stream(self, _other): ...
    def wait_event(self, _event): ...
    def record_event(self, _event=None): ...


class _Event(_Stream):
    def record(self, _stream=None): ...
    def query(self) -> bool:
        return True

    def elapsed_time(self, _other) -> float:
        return 0.0


def _device_module() -> types.ModuleType:
    """What verl calls through ``get_torch_device()``, for a CPU."""
    m = types.ModuleType("verl_cpu_device")
    m.is_available = lambda: True
    m.device_count = lambda: 1
    m.current_device = lambda: "cpu"
    m.get_device_name = lambda *_a: "cpu"
    m.set_device = m.synchronize = m.empty_cache = m.ipc_collect = _noop
    m.set_per_process_memory_fraction = m.reset_peak_memory_stats = _noop
    m.memory_allocated = m.max_memory_allocated = m.memory_reserved = m.max_memory_reserved = _zero
    m.mem_get_info = lambda *_a: (psutil.virtual_memory().available, psutil.virtual_memory().total)
    m.manual_seed = m.manual_seed_all = torch.manual_seed
    m.get_rng_state = lambda *_a: torch.get_rng_state()
    m.set_rng_state = lambda state, *_a: torch.set_rng_state(state)
    m.Stream, m.Event = _Stream, _Event
    m.current_stream = lambda *_a: _Stream()
    m.stream = lambda *_a: contextlib.nullcontext()
    return m


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    _module = _device_module()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return False  # never auto-detected: only VERL_PLATFORM=cpu selects it

    def current_device(self) -> Any:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None: ...
    def synchronize(self, device_index=None) -> None: ...

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None: ...
    def empty_cache(self) -> None: ...

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "VERL_CPU_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None: ...
    def profiler_stop(self) -> None: ...

    def cudart(self) -> Any:
        return None


def _gloo_only_process_groups() -> None:
    """verl 0.9.1 workaround: ``verl.utils.distributed.initialize_global_process_group_ray`` builds the
    backend string ``f"cpu:gloo,{device}:{backend}"``, which torch rejects when the device is the CPU
    itself ("Duplicate device type cpu"). Default it to plain ``cpu:gloo``; the modules that import the
    function by name are patched too if they were imported first."""
    import sys

    from verl.utils import distributed

    original = distributed.initialize_global_process_group_ray
    if getattr(original, "gloo_only", False):
        return

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or "cpu:gloo")

    initialize_global_process_group_ray.gloo_only = True
    for name in ("verl.utils.distributed", "verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        if name in sys.modules:
            sys.modules[name].initialize_global_process_group_ray = initialize_global_process_group_ray
    # The torchrun SFT trainer (verl.trainer.sft_trainer.run_sft) calls initialize_global_process_group,
    # which hard-codes the same string; it imports the function at call time, so the module attribute is
    # what it gets.
    distributed.initialize_global_process_group = _initialize_gloo_process_group


def _initialize_gloo_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
    """verl 0.9.1's ``initialize_global_process_group`` with a ``cpu:gloo`` backend (same return value)."""
    from datetime import timedelta

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="cpu:gloo", timeout=timedelta(seconds=timeout_second),
                                             init_method=os.environ.get("DIST_INIT_METHOD", None))
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _unpinned_cpu_offload() -> None:
    """verl 0.9.1 workaround: forward-only FSDP2 models (the reference policy) are built with
    ``CPUOffloadPolicy(pin_memory=True)``, and pinning needs an accelerator. Hand verl's FSDP engine
    (which imports the class from ``verl.utils.fsdp_utils``) a policy that never pins."""
    from verl.utils import fsdp_utils

    base = fsdp_utils.CPUOffloadPolicy
    if base is None or getattr(base, "unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(base):
        unpinned = True

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    fsdp_utils.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
    _gloo_only_process_groups()
    _unpinned_cpu_offload()
