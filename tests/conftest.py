"""Shared fixtures: everything the tests need is built here, offline (no hub, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers module beside the tests (not a package)


@pytest.fixture(scope="session")
def dev_tokenizer_dir(tmp_path_factory) -> Path:
    from recipe.retool.dev.tokenizer import save_dev_tokenizer

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


class SandboxServer:
    """Our real sandbox server on a free loopback port, with canary secrets in *its* environment."""

    SECRET = "canary-secret-7f3a"

    def __new__(cls, workers: int = 2):
        import os

        from recipe.retool.processes import LocalSandbox

        env = dict(os.environ, HF_TOKEN=cls.SECRET, WANDB_API_KEY=cls.SECRET, RETOOL_TEST_SECRET=cls.SECRET)
        server = LocalSandbox(workers=workers, env=env, cwd=str(REPO)).wait()
        server.SECRET = cls.SECRET
        return server


@pytest.fixture(scope="session")
def sandbox_server():
    server = SandboxServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_server():
    """A one-worker sandbox that requires a bearer token (``server.token``)."""
    import os

    from recipe.retool.processes import LocalSandbox

    token = "t0k-" + os.urandom(8).hex()
    env = dict(os.environ, RETOOL_SANDBOX_TOKEN=token)
    server = LocalSandbox(workers=1, env=env, cwd=str(REPO), extra_args=["--preload", "math"]).wait()
    server.token = token
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, dev_tokenizer) -> Path:
    """A random-init Qwen2-architecture model (2 layers, hidden 64) with the dev tokenizer."""
    from recipe.retool.dev.tokenizer import save_tiny_qwen2

    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), dev_tokenizer)


# tests that start a sandbox server: it puts each request in its own cgroup, which needs root
# (`-m "not root"` leaves them out); the end-to-end runs start one too
_ROOT_FIXTURES = {"sandbox_server", "token_server"}
_ROOT_FILES = {"test_miniature.py", "test_mini_grpo.py", "test_pipeline.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if "sandbox" in path.parent.name or path.name in _ROOT_FILES or _ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
