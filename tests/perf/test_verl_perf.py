"""recipe.retool.perf.verl_perf: the chunked log-prob fallback equals verl's row loop, and is installed."""

from __future__ import annotations

import pytest
import torch

from recipe.retool.perf import verl_perf


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (3, 700)), (torch.bfloat16, (2, 1500)), (torch.float32, (2500,))])
def test_chunked_equals_verls_row_loop(dtype, shape, monkeypatch):
    monkeypatch.setattr(verl_perf, "CHUNK_ROWS", 256)  # several chunks, a ragged last one
    torch.manual_seed(0)
    vocab = 97
    logits = (torch.randn(*shape, vocab) * 3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, shape)
    reference = _row_loop(logits.detach().clone().requires_grad_(True), labels)
    ours = verl_perf.logprobs_from_logits_chunked(logits, labels)
    assert ours.shape == labels.shape and ours.dtype == reference.dtype
    torch.testing.assert_close(ours, reference)
    ours.sum().backward()  # gradients flow through every chunk
    assert logits.grad.shape == logits.shape and torch.isfinite(logits.grad.float()).all()
    assert (logits.grad.float().abs().sum(-1) > 0).all()


def _row_loop(logits, labels):
    """verl 0.9.1's fallback, restated for comparison (one row at a time)."""
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if flat.dtype in (torch.float32, torch.float64):
        out = torch.gather(flat, -1, lab.unsqueeze(-1)).squeeze(-1) - torch.stack([torch.logsumexp(r, -1) for r in flat])
    else:
        out = torch.stack([torch.log_softmax(r, -1)[t] for r, t in zip(flat, lab, strict=True)])
    return out.view(labels.shape)


def test_installed_into_verl_only_without_flash_attn():
    from verl.utils import torch_functional as tf

    assert verl_perf.PATCHED == (not tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE)
    if verl_perf.PATCHED:  # CPU machines: no flash-attn, so the dispatcher now reaches the chunked version
        assert tf.logprobs_from_logits_v2 is verl_perf.logprobs_from_logits_chunked
        logits, labels = torch.randn(4, 5, 11), torch.randint(0, 11, (4, 5))
        torch.testing.assert_close(tf.logprobs_from_logits(logits, labels),
                                   torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1))
