"""Development scaffolding: what lets the whole recipe run on a laptop or in CI, not the recipe itself.

- ``mini_task``: a seeded arithmetic task where the interpreter is necessary (the miniature's data);
- ``pretrain_copy``: a short generic copying objective, the miniature's stand-in for pretraining;
- ``miniature``: the miniature's stages end to end (data, SFT, GRPO, evaluation), its report card and curve;
- ``openai_server``: an OpenAI-compatible chat server over the ``hf_dev`` engine, for evaluation over HTTP;
- ``hf_rollout``: the ``hf_dev`` rollout backend for verl, generation with plain transformers;
- ``cpu_platform``: a CPU entry for verl's platform registry (``VERL_PLATFORM=cpu``), so verl trains without a GPU;
- ``tokenizer``: a small offline BPE tokenizer with a hermes tool-calling chat template, and a tiny Qwen2 builder;
- ``config/``: the miniature's SFT and GRPO configs and the debug GRPO configs (``retool_grpo_debug[_cpu]``),
  composed over the production ones.

Production runs use none of this: real models and tokenizers, SGLang/vLLM, GPUs.
"""
