"""Development scaffolding: what lets the whole recipe run on a laptop or in CI, not the recipe itself.

- ``mini_task``: a seeded arithmetic task where the interpreter is necessary (the miniature's data);
- ``config/``: the miniature's SFT and GRPO configs, composed over the production ones.

Production runs use none of this: real models and tokenizers, SGLang/vLLM, GPUs.
"""
