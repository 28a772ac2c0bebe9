"""recipe/retool/perf/packed_attention.py: attention within each packed sequence, as SDPA over each alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipe.retool.perf import packed_attention
from recipe.retool.perf.attention import CUDNN_ENV
from recipe.retool.perf.packed_attention import NAME, packed_attention_forward, sequence_boundaries

LENGTHS = [5, 9, 1, 7]


def test_boundaries_come_from_position_resets_and_jumps():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 7, 8]])
    cu, longest = sequence_boundaries(pos)
    assert cu.tolist() == [0, 3, 5, 9, 11] and cu.dtype == torch.int32 and longest == 4
    cu, longest = sequence_boundaries(torch.arange(6)[None])
    assert cu.tolist() == [0, 6] and longest == 6


def _model(tiny_model_dir, attn: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attn,
                                                dtype=torch.float32).eval()


def _packed_inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, vocab, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return seqs, ids, pos


def test_packed_model_matches_each_sequence_alone_in_logits_and_gradients(tiny_model_dir):
    ref = _model(tiny_model_dir, "sdpa")
    packed = _model(tiny_model_dir, NAME)
    seqs, ids, pos = _packed_inputs(ref.config.vocab_size)

    out = packed(input_ids=ids, position_ids=pos).logits[0]
    alone = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)

    out.logsumexp(-1).sum().backward()
    alone.logsumexp(-1).sum().backward()
    for (name, p), q in zip(packed.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_wrong_boundaries_would_show(tiny_model_dir, monkeypatch):
    """The comparison above can fail: attending across sequences (one long sequence) changes the logits."""
    ref = _model(tiny_model_dir, "sdpa")
    packed = _model(tiny_model_dir, NAME)
    seqs, ids, pos = _packed_inputs(ref.config.vocab_size)
    monkeypatch.setattr(packed_attention, "_boundaries_cached", lambda p: sequence_boundaries(torch.arange(p.numel())))
    out = packed(input_ids=ids, position_ids=pos).logits[0]
    alone = torch.cat([ref(input_ids=s[None]).logits[0] for s in seqs])
    assert not torch.allclose(out, alone, rtol=1e-3, atol=1e-3)


def test_batches_without_packing_are_causal_per_row(tiny_model_dir):
    ref = _model(tiny_model_dir, "sdpa")
    packed = _model(tiny_model_dir, NAME)
    ids = torch.randint(3, ref.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(packed(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def _qkv(length: int, heads: int = 6, kv_heads: int = 2, dim: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, h, length, dim, generator=g).to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("gqa", [False, True])
def test_single_sequence_sdpa_path_matches_the_reference_in_values_and_gradients(gqa):
    """The path a one-sequence pack takes on a GPU (SDPA, cuDNN first), with the key/value heads
    repeated or passed grouped (``gqa``): each query head meets its group's key/value head, causal,
    the (1, len, heads, dim) layout transformers expects back."""
    q, k, v = _qkv(37)
    out = packed_attention._one_sequence_sdpa(q, k, v, 0.3, gqa=gqa)
    ref = packed_attention._per_sequence_sdpa(*(t[0].transpose(0, 1) for t in (q, k, v)), torch.tensor([0, 37]), 0.3)
    assert out.shape == (1, 37, 6, 16)
    torch.testing.assert_close(out[0], ref)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    # and a wrong head mapping would show: key/value heads tiled instead of repeated per group
    tiled = packed_attention.F.scaled_dot_product_attention(q, k.repeat(1, 3, 1, 1), v.repeat(1, 3, 1, 1), is_causal=True, scale=0.3)
    assert not torch.allclose(out, tiled.transpose(1, 2), atol=1e-3)


@pytest.mark.parametrize(("lengths", "env", "hopper", "expected"), [
    ([12], None, True, "one_sequence"), ([12], "1", True, "one_sequence"), ([12], "0", True, "varlen"),
    ([12], "gqa", True, "one_sequence_gqa"), ([5, 7], "gqa", True, "varlen"),
    ([5, 7], None, True, "varlen"), ([12], None, False, "varlen"),
    ([(12, 40)], None, True, "one_sequence"),  # a lone sequence whose positions start at 40 (a continued chunk)
])
def test_which_kernel_a_pack_gets_on_a_gpu(monkeypatch, lengths, env, hopper, expected):
    """On a Hopper GPU a one-sequence pack goes to SDPA (cuDNN first) unless RETOOL_PACKED_CUDNN=0,
    with its grouped key/value heads as they are under RETOOL_PACKED_CUDNN=gqa; packs of several
    sequences, and every pack on other GPUs (where cuDNN's kernel was not measured faster), go to the
    varlen kernel. The kernels are replaced by the CPU reference here."""
    calls = []
    one, per = packed_attention._one_sequence_sdpa, packed_attention._per_sequence_sdpa
    monkeypatch.setattr(packed_attention, "_on_gpu", lambda t: True)
    monkeypatch.setattr(packed_attention, "_cudnn_preferred", lambda device: hopper)
    monkeypatch.setattr(packed_attention, "varlen_attn", object())
    monkeypatch.setattr(packed_attention, "_one_sequence_sdpa",
                        lambda *a, gqa: calls.append("one_sequence" + "_gqa" * gqa) or one(*a, gqa=gqa))
    monkeypatch.setattr(packed_attention, "_varlen", lambda q, k, v, cu, m, s: calls.append("varlen") or per(q, k, v, cu, s))
    if env is None:
        monkeypatch.delenv(CUDNN_ENV, raising=False)
    else:
        monkeypatch.setenv(CUDNN_ENV, env)
    spans = [n if isinstance(n, tuple) else (n, 0) for n in lengths]  # (length, first position)
    sizes = [n for n, _ in spans]
    q, k, v = _qkv(sum(sizes), dtype=torch.bfloat16)  # the fast kernels' precision
    pos = torch.cat([torch.arange(start, start + n) for n, start in spans])[None]
    out, _ = packed_attention_forward(None, q, k, v, None, scaling=0.25, position_ids=pos)
    assert calls == [expected]
    bounds = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    torch.testing.assert_close(out[0], per(*(t[0].transpose(0, 1) for t in (q, k, v)), bounds, 0.25))


def test_fp32_on_a_gpu_goes_per_sequence(monkeypatch):
    """The flash and cuDNN kernels refuse fp32 ("FlashAttention only support fp16 and bf16"): an fp32
    numerics run on CUDA attends per sequence instead of failing at the first step."""
    def refuse(*a, **kw):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    monkeypatch.setattr(packed_attention, "_on_gpu", lambda t: True)
    monkeypatch.setattr(packed_attention, "_cudnn_preferred", lambda device: True)
    monkeypatch.setattr(packed_attention, "varlen_attn", object())
    monkeypatch.setattr(packed_attention, "_one_sequence_sdpa", refuse)
    monkeypatch.setattr(packed_attention, "_varlen", refuse)
    for lengths in ([12], [5, 7]):
        q, k, v = _qkv(sum(lengths))
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        out, _ = packed_attention_forward(None, q, k, v, None, position_ids=pos)
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        torch.testing.assert_close(out[0], packed_attention._per_sequence_sdpa(*(t[0].transpose(0, 1) for t in (q, k, v)), bounds, None))
    with pytest.raises(RuntimeError, match="FlashAttention"):  # half precision still takes the fast kernels
        packed_attention_forward(None, *_qkv(12, dtype=torch.bfloat16), None, position_ids=torch.arange(12)[None])


def test_a_bad_cudnn_switch_stops_the_launch(monkeypatch, tiny_model_dir, sample_data, tmp_path, capsys):
    """A value the workers would refuse at their first forward stops `train.py` before anything starts."""
    import subprocess

    from recipe.retool.perf.attention import Environment
    from recipe.retool.train import main

    # a machine where the SFT template's Ulysses size is allowed (flash-attn installed)
    monkeypatch.setattr(Environment, "probe", classmethod(lambda cls: Environment(flash_attn=True, cuda=True, varlen=True)))
    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    monkeypatch.setenv(CUDNN_ENV, "maybe")
    data_dir = sample_data["sft"].parent.parent
    assert main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o")]) == 2
    assert not started and "RETOOL_PACKED_CUDNN='maybe'" in capsys.readouterr().err
    monkeypatch.setenv(CUDNN_ENV, "0")
    assert main(["sft", str(tiny_model_dir), str(data_dir), str(tmp_path / "o")]) == 0 and len(started) == 1


def test_unsupported_inputs_fail_with_a_reason():
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="unpadded input"):
        packed_attention_forward(None, q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout"):
        packed_attention_forward(None, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding windows"):
        packed_attention_forward(None, q, q, q, None, sliding_window=4)


def test_ulysses_sequence_parallelism_is_refused(monkeypatch):
    import verl.utils.ulysses as ulysses

    monkeypatch.setattr(ulysses, "get_ulysses_sequence_parallel_world_size", lambda *a: 4)
    q = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="Ulysses"):
        packed_attention_forward(None, q, q, q, None, position_ids=torch.arange(6)[None])


def test_verl_workers_get_it_through_the_recipes_external_lib():
    """``model.external_lib=recipe.retool.perf.packed_attention`` registers the attention and keeps verl_perf's patch."""
    import subprocess
    import sys

    probe = ("import recipe.retool.perf.packed_attention, recipe.retool.perf.verl_perf as v; from transformers import AttentionInterface; "
             f"print(v._tf.logprobs_from_logits_v2 is v.logprobs_from_logits_chunked or not v.PATCHED, "
             f"'{NAME}' in AttentionInterface._global_mapping)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True True"), proc.stderr[-2000:]


@pytest.mark.slow  # tens of seconds: a real trainer launch or a CLI in its own process
def test_verl_sft_trainer_packed_and_fused_match_padded_sdpa(tiny_model_dir, sample_data, tmp_path):
    """verl's SFT trainer (CPU platform): packed micro-batches through ``retool_packed``, and verl's
    fused log-prob path (retool.kernels; torch backend here), give the same per-step losses as padded
    SDPA batches with full logits (scripts/lab/attention_loss_curves.py compares longer runs)."""
    from train_runs import MINI_SFT as config
    from train_runs import run_sft

    from recipe.retool.perf.kernels import PACKED_SFT, fused_sft_overrides
    from recipe.retool.train import compose

    data_dir = Path(sample_data["sft"]).parents[1]
    padded = run_sft(tiny_model_dir, data_dir, tmp_path, "padded", 3)
    packed = run_sft(tiny_model_dir, data_dir, tmp_path, "packed", 3, PACKED_SFT)
    assert sorted(padded) == sorted(packed) == [1, 2, 3]
    for step in padded:
        assert packed[step] == pytest.approx(padded[step], rel=1e-4), (padded, packed)
    # the fused path takes the log-softmax in fp32 where the default path uses the compute dtype's
    # logits, so the pair agrees this closely only in fp32 compute: what the miniature's CPU config asks
    assert compose("mini_sft", [], config.parent).engine.mixed_precision.param_dtype == "fp32"
    fused = run_sft(tiny_model_dir, data_dir, tmp_path, "fused", 3, fused_sft_overrides("cpu"))
    assert "Using Torch backend for fused kernels" in (tmp_path / "fused.log").read_text()  # verl patched the forward
    assert sorted(fused) == [1, 2, 3]
    for step in padded:
        assert fused[step] == pytest.approx(padded[step], rel=1e-4), (padded, fused)
