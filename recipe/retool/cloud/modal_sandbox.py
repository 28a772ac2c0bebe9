"""The sandbox service on Modal: a web endpoint that autoscales with load.

    modal deploy recipe/retool/cloud/modal_sandbox.py
    modal run recipe/retool/cloud/modal_app.py::check_sandbox_connection

Serves the same FastAPI app as ``python -m recipe.retool.sandbox serve``. Training and evaluation
find its URL through ``modal.Function.from_name`` unless the experiment config sets ``sandbox.url``.

The endpoint is public: anyone with its URL could run code on the account. So it requires a bearer
token, ``RETOOL_SANDBOX_TOKEN``, from a Modal secret named in the experiment config's
``sandbox.secrets`` and/or the local ``.env`` (which wins when both set it); the container refuses
to serve without one. The GRPO tool and the evaluation harness read the same variable, which the
training and evaluation functions receive through their own secrets (``secrets:`` and ``.env``).

Modal runs containers under gVisor: the server checks at start-up which isolation mechanisms exist
there and refuses to serve without them unless ``sandbox.allow_unsafe: true`` (logged loudly).
"""

from __future__ import annotations

import logging
import os

import modal

from recipe.retool.cloud import launcher

logger = logging.getLogger(__name__)

EXP = launcher.load_experiment(os.environ.get("RETOOL_MODAL_CONFIG") or None)
S = EXP.sandbox

# Only the token travels to the sandbox container (it has no use for the other keys): from the named
# secrets of Modal's store in `sandbox.secrets` (keep them to a secret that holds only the token), then
# from the local .env, which wins when both set it
_TOKEN = launcher.load_env(launcher.ENV_FILE).get(launcher.SANDBOX_TOKEN_ENV) if modal.is_local() else None
if modal.is_local() and not _TOKEN and not S.secrets:
    logger.warning("%s is neither in .env nor in a Modal secret named in sandbox.secrets: the deployed sandbox "
                   "will refuse to serve", launcher.SANDBOX_TOKEN_ENV)
SECRETS = launcher.modal_secrets(S.secrets, {launcher.SANDBOX_TOKEN_ENV: _TOKEN} if _TOKEN else {})

app = modal.App(S.app_name)

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("fastapi", "uvicorn", "uvloop", "httptools", "pydantic>=2", "aiohttp", "pyyaml", "python-dotenv",
                 "omegaconf>=2.3",  # the launcher's typed experiment config, read when this file is imported
                 # what model-written snippets import; preloaded and warmed in every worker
                 "sympy", "numpy", "scipy", "networkx", "mpmath")
    .add_local_python_source("recipe")
)


def create_sandbox_app(environ: dict[str, str] | None = None):
    """The app the container serves; refuses (RuntimeError) without a token in ``environ``."""
    from recipe.retool.sandbox.pool import SandboxConfig
    from recipe.retool.sandbox.server import create_app

    environ = os.environ if environ is None else environ
    token = environ.get(launcher.SANDBOX_TOKEN_ENV)
    if not token:
        raise RuntimeError(f"refusing to serve a public sandbox endpoint without a bearer token: set "
                           f"{launcher.SANDBOX_TOKEN_ENV} in .env or in a Modal secret named in sandbox.secrets, "
                           "and redeploy")
    return create_app(SandboxConfig(workers=S.workers, allow_unsafe=S.allow_unsafe), token=token)


@app.function(image=image, cpu=S.cpu, memory=S.memory_mb, max_containers=S.max_containers,
              scaledown_window=300, timeout=3600, name=S.function, secrets=SECRETS)
@modal.concurrent(max_inputs=S.concurrency)
@modal.asgi_app()
def sandbox():
    return create_sandbox_app()
