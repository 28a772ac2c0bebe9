"""The transformers development rollout backend (``rollout.name=hf_dev``), without Ray."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.retool.dev import hf_rollout
from recipe.retool.dev.hf_rollout import DevGenerator, HFDevServer, Sampling, sample_next

GREEDY = Sampling(temperature=0.0, logprobs=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return DevGenerator(str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _greedy_reference(model, prompt, steps, eos_ids):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_batched_left_padded_greedy_matches_unbatched_full_recompute(engine, reference):
    prompts = [[5, 17, 9, 33, 2, 8], [41, 7], [3, 3, 3, 19]]
    outs = engine.generate(prompts, [12, 12, 5], GREEDY)
    for prompt, out, budget in zip(prompts, outs, [12, 12, 5], strict=True):
        assert out.token_ids == _greedy_reference(reference, prompt, budget, engine.eos_ids)
        assert len(out.token_ids) <= budget


def test_log_probs_are_the_models_own(engine, reference):
    prompt = [11, 4, 29, 6]
    torch.manual_seed(1)
    out = engine.generate([prompt], [10], Sampling(temperature=0.7, logprobs=True), torch.Generator().manual_seed(3))[0]
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = reference(input_ids=full).logits[0, len(prompt) - 1 : -1].float() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.log_probs), expected, atol=1e-4)


def test_no_log_probs_unless_asked(engine):
    out = engine.generate([[1, 2, 3]], [4], Sampling(temperature=0.0, logprobs=False))[0]
    assert out.log_probs is None and 0 < len(out.token_ids) <= 4


def test_each_row_stops_at_eos_and_the_batch_goes_on(engine):
    free = engine.generate([[5, 6, 7], [9, 9]], [10, 10], GREEDY)
    saved = engine.eos_ids
    engine.eos_ids = [free[0].token_ids[2]]  # the third token of row 0 now ends it
    try:
        stopped = engine.generate([[5, 6, 7], [9, 9]], [10, 10], GREEDY)
    finally:
        engine.eos_ids = saved
    assert stopped[0].token_ids == free[0].token_ids[: free[0].token_ids.index(free[0].token_ids[2]) + 1]
    row1 = free[1].token_ids
    cut = row1.index(free[0].token_ids[2]) + 1 if free[0].token_ids[2] in row1 else len(row1)
    assert stopped[1].token_ids == row1[:cut]


def test_top_k_and_top_p_restrict_the_sampled_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2, _ = sample_next(logits, Sampling(top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    nucleus, _ = sample_next(logits, Sampling(top_p=0.7), g)  # 0.5 + 0.3 crosses 0.7: keep two
    assert set(nucleus.tolist()) == {0, 1}
    full, _ = sample_next(logits, Sampling(), g)
    freq = torch.bincount(full, minlength=4).float() / len(full)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_unsupported_sampling_is_refused():
    with pytest.raises(ValueError, match="repetition_penalty"):
        Sampling.from_params({"temperature": 1.0, "repetition_penalty": 1.1})


def test_load_weights_takes_tied_names_as_the_actor_sends_them(engine):
    sd = {n: t.detach().clone() for n, t in engine.model.state_dict().items()}
    assert "lm_head.weight" in sd  # tied to the input embedding, yet exported by name
    assert engine.load_weights(sd.items()) == len(sd)


def test_load_weights_changes_generation_and_checks_names(engine, tiny_model_dir):
    before = engine.generate([[9, 8, 7]], [8], GREEDY)[0].token_ids
    originals = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    try:
        torch.manual_seed(5)
        engine.load_weights((n, torch.randn_like(p)) for n, p in originals.items())
        assert engine.generate([[9, 8, 7]], [8], GREEDY)[0].token_ids != before
        with pytest.raises(KeyError, match="model.not_a_layer.weight"):
            engine.load_weights([("model.not_a_layer.weight", torch.zeros(2))])
        name, p = next(iter(originals.items()))
        with pytest.raises(ValueError, match=name):
            engine.load_weights([(name, torch.zeros(p.numel() + 1))])
    finally:
        engine.load_weights(originals.items())
    assert engine.generate([[9, 8, 7]], [8], GREEDY)[0].token_ids == before


def test_server_batches_concurrent_requests_and_applies_budget(tiny_model_dir):
    server = HFDevServer(str(tiny_model_dir), prompt_length=8, response_length=6, max_model_len=None, device="cpu")

    async def run():
        params = {"temperature": 0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
        outs = await asyncio.gather(*[server.generate([i + 1, 2, 3], dict(params), f"r{i}") for i in range(6)])
        capped = await server.generate(list(range(1, 13)), dict(params), "long")  # 12 + 6 > 8 + 6: budget 2
        explicit = await server.generate([1, 2], {**params, "max_tokens": 3}, "explicit")
        with pytest.raises(ValueError, match="max_model_len"):
            await server.generate(list(range(1, 15)), dict(params), "too-long")
        return outs, capped, explicit

    outs, capped, explicit = asyncio.run(run())
    assert all(0 < len(o.token_ids) <= 6 and len(o.log_probs) == len(o.token_ids) for o in outs)
    assert len(capped.token_ids) <= 2 and len(explicit.token_ids) <= 3
    stats = server.get_stats()
    assert stats["requests"] == 8 and stats["batches"] < stats["requests"]  # the six concurrent ones shared
    assert outs[0].stop_reason == "completed"


def test_backend_is_registered_with_verl():
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    assert get_rollout_replica_class(hf_rollout.BACKEND) is hf_rollout.HFDevReplica
    assert get_rollout_class(hf_rollout.BACKEND, "async") is hf_rollout.HFDevServerAdapter
