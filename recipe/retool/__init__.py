"""ReTool: teach an LLM to solve competition math by writing and running Python.

Stages (each a module with its own CLI, ``python -m recipe.retool.<stage> --help``):

- ``data``              ReTool-SFT / DAPO-Math-17k / AIME → verl parquet files
- ``prefilter_dataset`` drop rows whose prompt / response is too long for the token budget
- ``sandbox``           SandboxFusion-compatible code-execution server
- ``train``             SFT and GRPO command builders over verl's trainers
- ``eval_aime24_standalone`` pass@k evaluation against an OpenAI-compatible server
- ``pipeline``          the whole pipeline locally on embedded defaults
- ``launcher`` / ``modal_app`` / ``modal_sandbox``   the cloud launcher (Modal)
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "config"
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"

__version__ = "0.1.0"
