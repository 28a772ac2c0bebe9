"""The CPU platform plugin for verl (recipe/retool/dev/cpu_platform.py) and its two verl 0.9.1 workarounds,
in a fresh interpreter configured as verl's Ray workers are (VERL_PLATFORM + VERL_USE_EXTERNAL_MODULES)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from recipe.retool.processes import free_port

PROBE = r"""
import json, torch
import verl
from verl.utils.device import get_device_name, get_device_id, get_nccl_backend, get_torch_device
from verl.utils import distributed, fsdp_utils
from verl.workers import engine_workers  # imports the process-group helper by name
engine_workers.initialize_global_process_group_ray(timeout_second=60)
t = torch.ones(3).to(get_device_id())
torch.distributed.all_reduce(t)
print(json.dumps({
    "device": get_device_name(), "device_id": str(get_device_id()), "backend": get_nccl_backend(),
    "pg_backend": torch.distributed.get_backend(), "sum": t.tolist(),
    "free_mem": get_torch_device().mem_get_info()[0] > 0,
    "pin_memory": fsdp_utils.CPUOffloadPolicy().pin_memory,
}))
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           **env_extra}
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_verl_runs_its_process_group_and_fsdp_offload_on_the_cpu_platform():
    proc = _run({"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_MODULES": "recipe.retool.dev.cpu_platform"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"device": "cpu", "device_id": "cpu", "backend": "gloo", "pg_backend": "cpu:gloo", "sum": [1.0] * 3,
                   "free_mem": True, "pin_memory": False}


def test_importing_the_plugin_changes_nothing_unless_the_platform_is_chosen():
    probe = ("import json, verl; from verl.utils.device import get_device_name; from verl.utils import fsdp_utils; "
             "print(json.dumps([get_device_name(), fsdp_utils.CPUOffloadPolicy().pin_memory]))")
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env["VERL_USE_EXTERNAL_MODULES"] = "recipe.retool.dev.cpu_platform"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["cuda", True]  # verl's own defaults
