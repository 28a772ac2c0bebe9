"""The sandbox service on Modal: a web endpoint that autoscales with load.

    modal deploy recipe/retool/modal_sandbox.py
    modal run recipe/retool/modal_app.py::check_sandbox_connection

Serves the same FastAPI app as ``python -m recipe.retool.sandbox serve``. Training and evaluation
find its URL through ``modal.Function.from_name`` unless the experiment config sets ``sandbox.url``.
Modal runs containers under gVisor: the server checks at start-up which isolation mechanisms exist
there and refuses to serve without them unless ``sandbox.allow_unsafe: true`` (logged loudly).
"""

from __future__ import annotations

import os

import modal

from recipe.retool import launcher

EXP = launcher.load_experiment(os.environ.get("RETOOL_MODAL_CONFIG") or None)
S = EXP.sandbox

app = modal.App(S.app_name)

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install("fastapi", "uvicorn", "uvloop", "httptools", "pydantic>=2", "aiohttp", "pyyaml", "python-dotenv",
                 "omegaconf>=2.3",  # the launcher's typed experiment config, read when this file is imported
                 # what model-written snippets import; preloaded and warmed in every worker
                 "sympy", "numpy", "scipy", "networkx", "mpmath")
    .add_local_python_source("recipe")
)


@app.function(image=image, cpu=S.cpu, memory=S.memory_mb, max_containers=S.max_containers,
              scaledown_window=300, timeout=3600, name=S.function)
@modal.concurrent(max_inputs=S.concurrency)
@modal.asgi_app()
def sandbox():
    from recipe.retool.sandbox.pool import SandboxConfig
    from recipe.retool.sandbox.server import create_app

    return create_app(SandboxConfig(workers=S.workers, allow_unsafe=S.allow_unsafe))
