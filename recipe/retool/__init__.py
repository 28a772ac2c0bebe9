"""ReTool: teach an LLM to solve competition math by writing and running Python.

Stages (each a module with its own CLI, ``python -m recipe.retool.<stage> --help``):

- ``data``              ReTool-SFT / DAPO-Math-17k / AIME → verl parquet files
- ``prefilter_dataset`` drop rows whose prompt / response is too long for the token budget
- ``sandbox``           SandboxFusion-compatible code-execution server
- ``tools`` / ``reward`` the code-interpreter tool and the math reward verl loads
- ``train``             SFT and GRPO over verl's trainers (config check, launch)
- ``evaluate``          pass@k evaluation against an OpenAI-compatible server
- ``pipeline``          the production pipeline on one GPU node, every stage in order

Subpackages: ``perf`` (attention, kernels and compute dtype chosen at launch), ``cloud`` (the
Modal launcher), ``sandbox`` (the code-execution service, its own boundary: it imports nothing
of the recipe), ``dev`` (development scaffolding: the miniature, the CPU platform, ``hf_dev``).
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]  # a source checkout: config/, scripts/, .env
CONFIG_DIR = PACKAGE_DIR / "config"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"

__version__ = "0.1.0"
