"""The settings that cross stages and processes through the environment: each name and default once.

Hyperparameters live in the YAML configs; the environment carries only where things are, secrets
and machine switches (all of them listed in docs/environment.md). The sandbox's token variable is
the sandbox's own (it imports nothing of the recipe); the recipe reads the name from there.
"""

from recipe.retool.sandbox.app import TOKEN_ENV as SANDBOX_TOKEN_ENV  # noqa: F401  (the server's name for it)

# where GRPO's code tool finds the sandbox: retool_grpo_template.yaml reads it (retool.sandbox_url, with
# this default written there too: Hydra cannot import it), train.py passes the config's value on to
# verl's workers through the same variable, and the tool config reads it there
SANDBOX_URL_ENV = "RETOOL_SANDBOX_URL"
SANDBOX_PORT = 8080
DEFAULT_SANDBOX_URL = f"http://localhost:{SANDBOX_PORT}"
# where the evaluation finds the model server by default (vLLM's and SGLang's usual port)
MODEL_SERVER_PORT = 8000
DEFAULT_MODEL_URL = f"http://localhost:{MODEL_SERVER_PORT}/v1"
