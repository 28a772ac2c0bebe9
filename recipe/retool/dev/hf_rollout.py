"""``hf_dev``: a development/CI rollout backend for verl that generates with plain transformers.

verl 0.9.1 rolls out only through vLLM, SGLang or TensorRT-LLM. None of them installs on a CPU
machine, so without this module nothing short of a full GPU image can show that the GRPO loop
(`train_retool_grpo.sh`) trains. Production runs use SGLang (``rollout.name=sglang``, our
template's default); this backend exists to run the *real* ``verl.trainer.main_ppo`` loop in
miniature — tiny model, a few prompts, a few steps — on any machine, for debugging and CI.

What it does, and nothing more:
- token-in/token-out generation as verl's agent loop expects (``generate(prompt_ids,
  sampling_params, request_id) -> TokenOutput``), with the rollout's temperature / top-p / top-k,
  the per-request token budget and optional sampled-token log-probs; concurrent requests are
  decoded together in one padded batch with a KV cache;
- weight sync: each step the FSDP actor's full parameters are sent to the server
  (``update_weights``), so rollouts are on-policy;
- every control call the trainer makes (sleep, wake_up, abort, kv-cache, profiling) is accepted.
It has no paged KV cache, no continuous batching and no tensor parallelism: one server per
replica, a full copy of the weights, CPU tensors through Ray's object store on every sync.

Plugging in (verl's hooks only): importing this module registers the backend. Put
``VERL_USE_EXTERNAL_MODULES=recipe.retool.dev.hf_rollout`` in the environment of every verl process
(``ray_kwargs.ray_init.runtime_env.env_vars``; ``recipe/retool/dev/config/retool_grpo_debug.yaml`` does) and set
``actor_rollout_ref.rollout.name=hf_dev``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

BACKEND = "hf_dev"
ADAPTER_FQN = f"{__name__}.HFDevServerAdapter"


# ----------------------------------------------------------------------------- generation engine


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters verl's agent loop sends, normalised (requests that share them batch)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    logprobs: bool = False

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Sampling:
        rep = float(params.get("repetition_penalty", 1.0) or 1.0)
        if rep != 1.0:
            raise ValueError(f"{BACKEND}: repetition_penalty={rep} is not supported (only 1.0)")
        return cls(
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(-1 if params.get("top_k") is None else params["top_k"]),
            logprobs=bool(params.get("logprobs", False)),
        )


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None):
    """Next token per row from float logits (rows × vocab) and its log-probability.

    The log-probability is taken from the temperature-scaled distribution before top-k/top-p
    filtering (what the actor recomputes); temperature 0 means greedy.
    """
    if s.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / s.temperature
    filtered = scaled
    if 0 < s.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, s.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, -1) >= s.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    tokens = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator).squeeze(-1)
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)


@dataclass
class Generated:
    token_ids: list[int]
    log_probs: list[float] | None


class DevGenerator:
    """A Hugging Face causal LM that decodes batches of token-id prompts (no Ray, no verl)."""

    def __init__(self, model_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        eos: Any = None
        try:
            eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:  # no generation_config.json: the model config's eos
            pass
        eos = eos if eos is not None else config.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or ()))
        if not self.eos_ids:
            raise ValueError(f"{model_path}: no eos_token_id in generation_config.json or config.json")
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy full (unsharded) parameters by their Hugging Face names; returns how many."""
        params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names
        count = 0
        with torch.no_grad():
            for name, tensor in named:
                target = params.get(name)
                if target is None:
                    raise KeyError(f"{BACKEND}: weight '{name}' has no parameter in the rollout model")
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"{BACKEND}: weight '{name}' has shape {tuple(tensor.shape)}, "
                                     f"the rollout model expects {tuple(target.shape)}")
                target.copy_(tensor.to(target.device, target.dtype))
                count += 1
        return count

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], s: Sampling,
                 generator: torch.Generator | None = None) -> list[Generated]:
        """Decode a batch (left-padded, KV-cached); each row stops at eos or its own budget."""
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        budget = torch.tensor(list(max_new_tokens), device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        done = budget <= 0
        out_tokens: list[torch.Tensor] = []
        out_logps: list[torch.Tensor] = []
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_input, past = ids, None
        for step in range(int(budget.max().item()) if n else 0):
            if bool(done.all()):
                break
            out = self.model(input_ids=step_input, attention_mask=mask, position_ids=positions,
                             past_key_values=past, use_cache=True)
            past = out.past_key_values
            token, logp = sample_next(out.logits[:, -1].float(), s, generator)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out_tokens.append(torch.where(done, -1, token))
            out_logps.append(logp)
            done = done | torch.isin(token, eos) | (budget <= step + 1)
            step_input = token[:, None]
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
        results = []
        tokens = torch.stack(out_tokens, 1).tolist() if out_tokens else [[] for _ in range(n)]
        logps = torch.stack(out_logps, 1).tolist() if out_logps else [[] for _ in range(n)]
        for row, lps in zip(tokens, logps, strict=True):
            keep = [t for t in row if t >= 0]
            results.append(Generated(keep, lps[: len(keep)] if s.logprobs else None))
        return results


# ----------------------------------------------------------------------------- server (a Ray actor)


@dataclass
class _Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    future: asyncio.Future


class HFDevServer:
    """The rollout server verl's agent loop talks to: batches concurrent requests onto one model.

    Runs as a Ray actor (``HFDevReplica`` creates it); usable as a plain object in tests.
    """

    def __init__(self, model_path: str, *, prompt_length: int, response_length: int, max_model_len: int | None,
                 max_batch: int = 64, device: str | None = None, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, visible_devices: str | None = None, seed: int = 0):
        if visible_devices is not None:  # before CUDA initialises in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from recipe.retool.perf.precision import cpu_dtype

        torch_dtype = getattr(torch, cpu_dtype(dtype) if device == "cpu" else dtype)
        self.engine = DevGenerator(model_path, device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        self.prompt_length, self.response_length = prompt_length, response_length
        self.max_model_len = max_model_len or prompt_length + response_length
        self.max_batch = max_batch
        self.generator = torch.Generator(device=self.engine.device).manual_seed(seed)
        self.global_steps: int | None = None
        self._queue: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._model_lock: asyncio.Lock | None = None
        self.stats = {"requests": 0, "batches": 0, "generated_tokens": 0, "weight_syncs": 0, "generate_s": 0.0}

    # --- verl's token-in/token-out call
    def _budget(self, prompt_len: int, params: dict[str, Any]) -> int:
        if prompt_len >= self.max_model_len:
            raise ValueError(f"{BACKEND}: prompt of {prompt_len} tokens exceeds max_model_len {self.max_model_len}")
        if "max_new_tokens" in params or "max_tokens" in params:
            wanted = int(params.get("max_new_tokens", params.get("max_tokens")))
        else:  # as verl's servers: the response budget, and never past prompt+response in total
            wanted = min(self.response_length, self.prompt_length + self.response_length - prompt_len)
        return max(0, min(wanted, self.max_model_len - prompt_len - 1))

    async def generate(self, prompt_ids, sampling_params: dict[str, Any], request_id: str, **_unused):
        self._ensure_loop()
        prompt = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        req = _Request(prompt, self._budget(len(prompt), sampling_params), Sampling.from_params(sampling_params),
                       asyncio.get_running_loop().create_future())
        self._queue.append(req)
        self._wakeup.set()
        gen: Generated = await req.future
        return TokenOutput(token_ids=gen.token_ids, log_probs=gen.log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wakeup, self._model_lock = asyncio.Event(), asyncio.Lock()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(0.005)  # let requests issued together arrive together
            self._wakeup.clear()
            while self._queue:
                head = self._queue[0].sampling
                batch = [r for r in self._queue if r.sampling == head][: self.max_batch]
                taken = {id(r) for r in batch}
                self._queue = [r for r in self._queue if id(r) not in taken]
                try:
                    async with self._model_lock:
                        started = time.perf_counter()
                        outs = await asyncio.to_thread(
                            self.engine.generate, [r.prompt_ids for r in batch],
                            [r.max_new_tokens for r in batch], head, self.generator)
                        self.stats["generate_s"] += time.perf_counter() - started
                except Exception as err:  # fail the requests, keep serving
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(err)
                    continue
                self.stats["requests"] += len(batch)
                self.stats["batches"] += 1
                for r, o in zip(batch, outs, strict=True):
                    self.stats["generated_tokens"] += len(o.token_ids)
                    if not r.future.done():
                        r.future.set_result(o)

    # --- weights
    async def update_weights(self, named: list[tuple[str, torch.Tensor]], global_steps: int | None = None) -> int:
        self._ensure_loop()
        async with self._model_lock:  # never swap weights under a running batch
            count = await asyncio.to_thread(self.engine.load_weights, named)
        self.global_steps = global_steps
        self.stats["weight_syncs"] += 1
        # one line per sync in the trainer's log (Ray forwards actor output): what the rollouts cost
        print(f"{BACKEND} server stats: {json.dumps({**self.stats, 'device': str(self.engine.device)})}", flush=True)
        return count

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)

    # --- control calls the trainer makes on every server; nothing to do for this backend
    async def wake_up(self): ...
    async def sleep(self):
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()

    async def abort_all_requests(self, reject_request: bool = False): ...
    async def resume_generation(self): ...
    async def clear_kv_cache(self): ...
    async def release_kv_cache(self): ...
    async def resume_kv_cache(self): ...
    async def start_profile(self, **kwargs): ...
    async def stop_profile(self): ...


# ----------------------------------------------------------------------------- verl glue


def server_name(replica_rank: int, suffix: str = "") -> str:
    return f"{BACKEND}_server_{replica_rank}{suffix}"


class HFDevReplica(RolloutReplica):
    """One ``HFDevServer`` actor per replica, on the node (and GPU) of the replica's first worker."""

    async def launch_servers(self):
        from verl.plugin.platform import get_platform

        if self.nnodes != 1:
            raise NotImplementedError(f"{BACKEND}: a replica spans one node (tensor parallel size ≤ GPUs per node)")
        var = get_platform().visible_devices_envvar()
        node_id, visible = await self.workers[0].__ray_call__.remote(
            lambda _self, v=var: (ray.get_runtime_context().get_node_id(), os.environ.get(v)))
        cfg, model = self.config, self.model_config
        name = server_name(self.replica_rank, self.name_suffix)
        server = ray.remote(HFDevServer).options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": {v: "1" for v in get_platform().ray_noset_envvars()}},
            name=name, max_concurrency=self.max_concurrency, num_cpus=0,
        ).remote(
            model.local_path if getattr(model, "local_path", None) else model.path,
            prompt_length=cfg.prompt_length, response_length=cfg.response_length,
            max_model_len=cfg.max_model_len, max_batch=cfg.max_num_seqs or 64, dtype=cfg.dtype,
            trust_remote_code=bool(model.trust_remote_code), visible_devices=visible, seed=cfg.seed or 0,
        )
        await server.get_stats.remote()  # constructed (model loaded) before the trainer goes on
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


class HFDevServerAdapter(BaseRollout):
    """Lives in each hybrid trainer worker: forwards the actor's weights to its replica's server."""

    def __init__(self, config, model_config, device_mesh, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        self.sleep_level = 2
        c = self.config
        self._replica_world = c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size
        self._server = None

    def _rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps=None, **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"{BACKEND}: weight wire format {wire_format!r}")
        named = [(n, t.detach().to("cpu")) async for n, t in _aiter(weights)]  # every rank: collectives
        rank = self._rank()
        if rank % self._replica_world == 0:
            if self._server is None:
                self._server = ray.get_actor(server_name(rank // self._replica_world))
            await self._server.update_weights.remote(named, global_steps)

    async def resume(self, tags: list[str]): ...
    async def release(self): ...


async def _aiter(items) -> AsyncIterator:
    if hasattr(items, "__aiter__"):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x


def register() -> None:
    """Make ``rollout.name=hf_dev`` known to verl in this process (idempotent)."""
    RolloutReplicaRegistry.register(BACKEND, lambda: HFDevReplica)
    # verl 0.9.1 workaround: the trainer-side adapter is looked up in a module-level table that has
    # no register function (verl.workers.rollout.base.get_rollout_class); add our one entry to it.
    rollout_base._ROLLOUT_REGISTRY[(BACKEND, "async")] = ADAPTER_FQN


register()
