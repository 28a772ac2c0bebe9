"""ReTool on verl: install with `pip install torch==2.13.0 && pip install -e ".[dev]"` (CPU)."""

from setuptools import find_packages, setup

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
    # GPU training image: the pins of verl 0.9.1's `sglang` extra
    "gpu": [
        "verl[sglang]==0.9.1",
        "torch==2.11.0",
        "torchvision==0.26.0",
        "torchaudio==2.11.0",
        "sglang==0.5.12",
        "transformers==5.9.0",
        "liger-kernel>=0.8.2",
    ],
    # cloud launcher
    "modal": ["modal>=1.0", "python-dotenv"],
}

setup(
    name="retool-verl",
    version="0.1.0",
    description="ReTool: tool-integrated RL for math reasoning, on verl",
    packages=find_packages(include=["recipe", "recipe.*"]),
    package_data={"recipe.retool": ["config/*.yaml", "config/*/*.yaml", "sample_data/*.jsonl", "*.sh"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
