"""A SandboxFusion-compatible code-execution service: fast (pre-forked warm workers) and isolated.

- ``api``        request/response models of the ``/run_code`` contract
- ``isolation``  what the kernel offers here (namespaces, uid drop, rlimits) and how we use it
- ``worker``     the warm worker process: forks one confined child per request
- ``pool``       the asyncio pool of workers the server dispatches to
- ``server``     the HTTP app (FastAPI) and ``serve`` CLI: ``python -m recipe.retool.sandbox serve``
- ``client``     an async client with retries, used by the RL tool and the evaluation harness
"""
