"""Where a training step's GPU time goes: one optimizer step under ``torch.profiler``, by kernel family.

Development scaffolding for ``scripts/lab/gpu_sft_proof.py --profile``. Loaded into verl's trainer
processes through the public ``model.external_lib`` hook (a list there may name several modules);
it does nothing unless ``RETOOL_PROFILE_DIR`` is set. Then, in every rank, the profiler starts
right after optimizer step ``RETOOL_PROFILE_STEP - 1`` (default 3) and stops right after step
``RETOOL_PROFILE_STEP``, and the rank writes ``profile-rank<R>.json`` (wall time of the step, the
time the GPU spent in kernels, and that time by family: matmul, attention, other, with the top
kernels) and ``profile-rank<R>.txt`` (the profiler's own table) into that directory.

The hook is PyTorch's global optimizer step hook, so it sees whatever optimizer the engine builds
without touching verl.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_FAMILIES = (  # (family, substrings of a lower-cased kernel name); first match wins
    ("attention", ("flash", "fmha", "attention", "attn", "varlen", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "cublas", "wgmma")),
    ("communication", ("nccl",)),
    ("cross_entropy", ("cross_entropy", "log_softmax", "logsoftmax", "softmax", "linear_cross")),
)


def family(kernel_name: str) -> str:
    """The family of a GPU kernel, from its name."""
    name = kernel_name.lower()
    for fam, keys in _FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def summarize(kernels: list[tuple[str, float, int]], wall_s: float, top: int = 15) -> dict:
    """kernels: (name, total device µs, calls) for each GPU kernel seen in the profiled step."""
    busy_us = sum(t for _, t, _ in kernels)
    by_family: dict[str, float] = {}
    for name, t, _ in kernels:
        by_family[family(name)] = by_family.get(family(name), 0.0) + t
    ranked = sorted(kernels, key=lambda k: -k[1])[:top]
    return {
        "step_wall_s": round(wall_s, 4),
        "gpu_busy_s": round(busy_us / 1e6, 4),
        "gpu_busy_share": round(busy_us / 1e6 / wall_s, 4) if wall_s else None,
        "kernel_launches": sum(c for _, _, c in kernels),
        "by_family_s": {k: round(v / 1e6, 4) for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "family": family(n), "s": round(t / 1e6, 4), "calls": c} for n, t, c in ranked],
    }


def _device_kernels(prof) -> list[tuple[str, float, int]]:
    """GPU kernels only: the profiler also lists each ``record_function`` range (verl's
    ``micro_batch0``, ``Optimizer.step#AdamW.step``, …) on the GPU timeline, spanning the kernels
    inside it; counting those too would count the same time twice."""
    from torch.autograd import DeviceType

    events = list(prof.key_averages())
    cpu_names = {e.key for e in events if getattr(e, "device_type", None) == DeviceType.CPU}
    out = []
    for evt in events:
        if getattr(evt, "device_type", None) != DeviceType.CUDA or evt.key in cpu_names:
            continue
        if getattr(evt, "is_user_annotation", False):
            continue
        total = getattr(evt, "self_device_time_total", None)
        if total is None:
            total = evt.self_cuda_time_total
        if total > 0:
            out.append((evt.key, float(total), int(evt.count)))
    return out


def _install(out_dir: Path, step: int) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    rank = int(os.environ.get("RANK", "0"))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    state = {"steps": 0, "prof": None, "t0": 0.0}

    def hook(optimizer, args, kwargs) -> None:
        state["steps"] += 1
        if state["steps"] == step - 1:
            sync()
            state["prof"] = torch.profiler.profile(activities=activities)
            state["prof"].start()
            state["t0"] = time.perf_counter()
        elif state["steps"] == step and state["prof"] is not None:
            sync()
            wall = time.perf_counter() - state["t0"]
            prof, state["prof"] = state["prof"], None
            prof.stop()
            out_dir.mkdir(parents=True, exist_ok=True)
            summary = summarize(_device_kernels(prof), wall)
            (out_dir / f"profile-rank{rank}.json").write_text(json.dumps(summary, indent=2))
            (out_dir / f"profile-rank{rank}.txt").write_text(
                prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
            print(f"[step_profiler] rank {rank}: optimizer step {step}: {json.dumps(summary['by_family_s'])}, "
                  f"GPU busy {summary['gpu_busy_share']}", flush=True)

    register_optimizer_step_post_hook(hook)


if os.environ.get("RETOOL_PROFILE_DIR"):
    _install(Path(os.environ["RETOOL_PROFILE_DIR"]), int(os.environ.get("RETOOL_PROFILE_STEP", "3")))
