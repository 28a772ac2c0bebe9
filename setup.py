"""ReTool on verl: install with `pip install torch==2.13.0 && pip install -e ".[dev]"` (CPU)."""

from pathlib import Path

from setuptools import find_packages, setup


def _requirements(path: str) -> list[str]:
    lines = (Path(__file__).parent / path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# verl 0.9.1 is the one pinned dependency we build on; torch is deliberately *not* listed, so that
# the CPU install path (pip install torch==2.13.0 first) never pulls a multi-GB CUDA build.
INSTALL_REQUIRES = [
    "verl==0.9.1",
    # what verl's agent loop, main_ppo and sft_trainer import beyond verl's base install
    # (its `verl-core` extra minus the GPU/video parts)
    "cachetools",
    "fastapi",
    "uvicorn",
    "uvloop",  # faster event loop for the sandbox server (picked up by uvicorn)
    "httptools",
    "pyzmq",
    "msgspec",
    "TransferQueue==0.1.11",  # main_ppo's v1 trainer (use_v1) passes batches through it
    "tensordict==0.10.0",  # the one version both verl (<=0.10) and TransferQueue (>=0.10) accept
    "datasets",
    "pyarrow>=19",
    "pandas",
    "pyyaml",
    "pydantic>=2",
    "httpx",
    "aiohttp",
    "openai>=1.40",
    "math-verify>=0.7",
    "sympy",
    "numpy",
    "tqdm",
    "rich",
    "python-dotenv",
    "matplotlib",
]

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
