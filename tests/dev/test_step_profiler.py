"""The development step profiler (scripts/lab/gpu_sft_proof.py --profile): kernel families and the hook."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from recipe.retool.dev.step_profiler import family, summarize

REPO = Path(__file__).resolve().parents[2]


def test_kernel_families_from_names():
    assert family("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert family("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert family("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "matmul"
    assert family("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert family("at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>") == "cross_entropy"
    assert family("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>") == "other"


def test_summary_adds_up_and_ranks():
    kernels = [("flash_fwd", 300.0, 28), ("gemm_a", 500.0, 100), ("elementwise_add", 200.0, 400)]
    s = summarize(kernels, wall_s=0.002, top=2)
    assert s["gpu_busy_s"] == 0.001 and s["gpu_busy_share"] == 0.5
    assert s["kernel_launches"] == 528
    assert s["by_family_s"] == {"matmul": 0.0005, "attention": 0.0003, "other": 0.0002}
    assert [k["name"] for k in s["top_kernels"]] == ["gemm_a", "flash_fwd"]


def test_hook_profiles_the_named_optimizer_step(tmp_path):
    """Imported with RETOOL_PROFILE_DIR set (as verl's external_lib imports it), it writes the profile of
    exactly one optimizer step, the one after the step before it."""
    script = textwrap.dedent("""
        import time, torch
        import recipe.retool.dev.step_profiler  # noqa: F401
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters())
        for i in range(5):
            if i == 2:
                time.sleep(0.2)  # inside the profiled step (the third optimizer step)
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RETOOL_PROFILE_DIR": str(tmp_path / "p"), "RETOOL_PROFILE_STEP": "3"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    summary = json.loads((tmp_path / "p" / "profile-rank0.json").read_text())
    assert 0.2 <= summary["step_wall_s"] < 2.0
    assert "Self CPU" in (tmp_path / "p" / "profile-rank0.txt").read_text()


def test_annotation_ranges_are_not_counted_as_kernels():
    """A record_function range shows on the GPU timeline too; only kernels count as busy time."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from recipe.retool.dev.step_profiler import _device_kernels

    def evt(key, device, t):
        return SimpleNamespace(key=key, device_type=device, self_device_time_total=t, count=1)

    prof = SimpleNamespace(key_averages=lambda: [
        evt("micro_batch0", DeviceType.CPU, 0.0), evt("micro_batch0", DeviceType.CUDA, 900.0),
        evt("flash_fwd_kernel", DeviceType.CUDA, 500.0), evt("aten::mm", DeviceType.CPU, 0.0)])
    assert _device_kernels(prof) == [("flash_fwd_kernel", 500.0, 1)]
