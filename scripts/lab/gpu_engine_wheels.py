"""Stage one GPU set (SGLang or vLLM, exactly as CI resolves it) for a GPU machine without internet.

    python recipe/retool/dev/check_gpu_resolves.py --report-dir R          # pip's resolution of each set
    python scripts/lab/gpu_engine_wheels.py --report R/gpu.json --name sglang [--part-mib 58]

Takes every package of the resolved set except those the GPU image already provides (torch 2.11.0
+cu130, triton, the CUDA libraries, numpy, …: ``IMAGE_PROVIDES``), downloads their wheels for
Python 3.12 / manylinux x86_64, unpacks them into one ``site/`` folder (``pip install --target``),
and writes it as an xz-compressed tar (level 1: fast to make on a small machine) split into parts of at most ``--part-mib`` MiB:
``.gpu/<name>-<NN>`` (git-ignored), one part per transfer. On the GPU machine::

    cat <parts in order> | xz -d | tar -x -C /tmp/stage      # -> /tmp/stage/site
    export PYTHONPATH=$PWD:/tmp/stage/site                    # the project first (verl ships a `recipe` package)

Left out on purpose (see scripts/lab/gpu_rollout.md): ``flashinfer-cubin`` (prebuilt kernels for sm100+
only; Hopper kernels are compiled at first use with the machine's nvcc) and pip's CUDA compiler
wheels (the machine has nvcc 13.0). Kept although the image has them: ``KEEP`` (versions that
verl/the engine need and the image's differ: the image's transformers 5.17 is outside verl's range).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_gpu_resolves import PLATFORMS, PYTHON_VERSION, SDIST_ONLY, normalize  # noqa: E402

# What the GPU machine's image holds already (its package list), at versions the sets accept.
IMAGE_PROVIDES = {
    "torch", "torchvision", "torchaudio", "triton", "numpy", "scipy", "pandas", "pyarrow", "pillow", "sympy", "mpmath",
    "networkx", "filelock", "fsspec", "jinja2", "markupsafe", "typing-extensions", "packaging", "setuptools", "pyyaml",
    "requests", "urllib3", "idna", "certifi", "charset-normalizer", "tqdm", "regex", "safetensors", "huggingface-hub",
    "hf-xet", "accelerate", "psutil", "protobuf", "grpcio", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit",
    "nvidia-cublas", "nvidia-cuda-cupti", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13",
    "nvidia-cufft", "nvidia-cufile", "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13",
    "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "nvidia-ml-py", "numba",
    "llvmlite", "cloudpickle", "msgpack", "einops", "sentencepiece", "tiktoken", "ninja", "cmake", "pybind11",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "tzdata",
    "click", "rich", "markdown-it-py", "mdurl", "pygments", "attrs", "aiohttp", "aiosignal", "aiohappyeyeballs",
    "frozenlist", "multidict", "yarl", "propcache", "anyio", "h11", "httpcore", "httpx", "tensorboard",
    "tensorboard-data-server", "markdown", "werkzeug", "absl-py", "opencv-python-headless", "peft", "timm",
    "xxhash", "uvloop", "typer", "shellingham", "wheel", "pip", "prometheus-client", "lxml",
    "tabulate", "sortedcontainers", "wrapt", "zipp", "joblib", "threadpoolctl", "scikit-learn", "cuda-core",
    "ml-dtypes", "importlib-metadata",
}
KEEP = {"transformers", "tokenizers"}
# Files of carried wheels that a dense model on Hopper never loads, removed from the staged copy only
# (the install sets stay whole): FA3 kernels (1 GB; only SGLang's `fa3` attention backend loads them,
# and verl 0.9.1 picks `flashinfer` for sglang>=0.5.12), Blackwell builds, the DeepSeek-only
# tilelang/tokenspeed kernels (imported by SGLang's DeepSeek V3.2/V4 and MLA code only), static libraries.
DROP = ["sgl_kernel/flash_ops.abi3.so", "sgl_kernel/sm100", "tokenspeed_triton", "tokenspeed_mla", "tilelang",
        "lib/*.a"]
LEAVE_OUT = {"flashinfer-cubin", "nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-tileiras",
             "retool-verl"}


def plan(report: Path) -> tuple[list[str], list[str]]:
    carry, skipped = [], []
    for item in json.loads(report.read_text())["install"]:
        name, version = normalize(item["metadata"]["name"]), item["metadata"]["version"]
        if name in LEAVE_OUT or (name in IMAGE_PROVIDES and name not in KEEP):
            skipped.append(f"{name}=={version}")
        else:
            carry.append(f"{name}=={version}")
    return sorted(carry), sorted(skipped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, required=True, help="pip's report of the set (check_gpu_resolves.py)")
    p.add_argument("--name", required=True, help="prefix of the parts under .gpu/")
    p.add_argument("--part-mib", type=int, default=58)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-engine-wheels")
    args = p.parse_args()
    carry, skipped = plan(args.report)
    print(f"carrying {len(carry)} packages, {len(skipped)} left to the image or out", flush=True)
    wheels, site = args.work / args.name / "wheels", args.work / args.name / "site"
    wheels.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(site, ignore_errors=True)
    plat = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for pl in PLATFORMS:
        plat += ["--platform", pl]
    pip = [sys.executable, "-m", "pip"]
    sdist_only = {normalize(s.split("==")[0]) + "==" + s.split("==")[1] for s in SDIST_ONLY}
    binary = [c for c in carry if c not in sdist_only]
    subprocess.run([*pip, "download", "-q", "--no-deps", *plat, "-d", str(wheels), *binary], check=True)
    if built := [c for c in carry if c in sdist_only]:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), *built], check=True)
    files = sorted(wheels.glob("*.whl"))
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-compile", "--ignore-requires-python", "--target", str(site), *plat,
                    *map(str, files)], check=True)
    for pattern in DROP:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = REPO / ".gpu"
    out.mkdir(exist_ok=True)
    for old in out.glob(f"{args.name}-[0-9][0-9]"):
        old.unlink()
    tar = subprocess.Popen(["tar", "-C", str(site.parent), "-cf", "-", "site"], stdout=subprocess.PIPE)
    xz = subprocess.Popen(["xz", "-T2", "-1", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
    tar.stdout.close()
    subprocess.run(["split", "-d", "-b", f"{args.part_mib}m", "-", str(out / f"{args.name}-")], stdin=xz.stdout, check=True)
    if xz.wait() or tar.wait():
        sys.exit("tar/xz failed")
    parts = sorted(out.glob(f"{args.name}-[0-9][0-9]"))
    mib = sum(f.stat().st_size for f in parts) / 2**20
    wheel_mib = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} wheels ({wheel_mib:.0f} MiB) -> {len(parts)} parts, {mib:.0f} MiB: "
          + " ".join(str(f.relative_to(REPO)) for f in parts))
    (out / f"{args.name}.json").write_text(json.dumps({"carry": carry, "image_or_left_out": skipped}, indent=1))
    assert all(re.fullmatch(r"[\w.+-]+==[\w.+!-]+", c) for c in carry)


if __name__ == "__main__":
    main()
