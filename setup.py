"""ReTool on verl: install with `pip install torch==2.13.0 && pip install -e ".[dev]"` (CPU)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(path: str) -> list[str]:
    lines = (Path(__file__).parent / path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# The recipe's own requirements (verl 0.9.1 pinned, the loggers our configs name, …) live in one file
# that the Modal image reads too; torch is deliberately *not* listed, so that the CPU install path
# (pip install torch==2.13.0 first) never pulls a multi-GB CUDA build.
INSTALL_REQUIRES = _requirements("recipe/retool/requirements.txt")

EXTRAS = {
    # tests and dev tools (CPU only)
    "dev": [
        "pytest>=8",
        "pytest-asyncio>=0.23",
        "pytest-timeout",
        "sandbox-fusion",  # the official SandboxFusion client: our server must serve it unmodified
        "modal>=1.0",
        "ruff",
    ],
    # GPU training/serving sets, one file each (the Modal image reads the same files; CI resolves them
    # with scripts/check_gpu_resolves.py): SGLang, the recipe's default rollout engine (sglang 0.5.13,
    # overriding verl[sglang]'s unresolvable pins: see the file), and vLLM (verl 0.9.1's own `vllm` pins)
    "gpu": _requirements("recipe/retool/requirements-gpu.txt"),
    "gpu-vllm": _requirements("recipe/retool/requirements-gpu-vllm.txt"),
    # cloud launcher
    "modal": ["modal>=1.0", "python-dotenv"],
}

setup(
    name="retool-verl",
    version="0.1.0",
    description="ReTool: tool-integrated RL for math reasoning, on verl",
    packages=find_packages(include=["recipe", "recipe.*"]),
    package_data={"recipe.retool": ["config/*.yaml", "config/*/*.yaml", "dev/config/*.yaml", "sample_data/*.jsonl", "*.sh", "*.txt"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
