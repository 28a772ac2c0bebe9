"""Shared fixtures: everything the tests need is built here, offline (no hub, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers module beside the tests (not a package)


@pytest.fixture(scope="session")
def dev_tokenizer_dir(tmp_path_factory) -> Path:
    from recipe.retool.dev_tokenizer import save_dev_tokenizer

    return save_dev_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def dev_tokenizer(dev_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dev_tokenizer_dir))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict[str, Path]:
    """The bundled samples converted once by the real data stage."""
    from recipe.retool.data import SAMPLE_SOURCES, prepare_all

    return prepare_all(tmp_path_factory.mktemp("data"), SAMPLE_SOURCES)
