"""A SandboxFusion-compatible code-execution service: fast (pre-forked warm workers) and isolated.

A boundary of its own: it imports nothing of the recipe, and its modules import one another one way
(``server`` → ``fronts`` → ``app`` → ``pool`` → ``worker``; ``tests/sandbox/test_sandbox_layers.py``).
The user guide is ``README.md`` beside this file.

- ``api``        request/response models of the ``/run_code`` contract
- ``isolation``  what the kernel offers here (namespaces, allowlisted root, uid drop, rlimits) and how we use it
- ``seccomp``    the system-call filter of every request
- ``cgroup``     per-request memory and pids budgets (cgroup v1 or v2)
- ``worker``     the warm worker process: a manager and a zygote that forks one confined child per request
- ``pool``       the asyncio pool of workers the server dispatches to
- ``app``        the HTTP app (FastAPI) one front serves: endpoints, bearer token, body limit
- ``fronts``     several HTTP front processes over that one pool (Unix socket pairs to the pool's process)
- ``connections`` bounds on a front's HTTP connections: timeouts, header size, how many are open
- ``server``     the ``serve`` and ``check`` CLI: ``python -m recipe.retool.sandbox serve``
- ``client``     an async client with retries, used by the RL tool and the evaluation harness
"""
