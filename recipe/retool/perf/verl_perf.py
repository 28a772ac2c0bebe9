"""Workaround for verl 0.9.1: per-token log-probs without flash-attn are computed one row at a time.

When flash-attn's Triton cross-entropy is not importable, ``verl.utils.torch_functional.
logprobs_from_logits`` falls back to ``logprobs_from_logits_v2``, which loops over the rows of a
(tokens × vocab) logits matrix in Python: thousands of tiny kernels (and autograd nodes) per
micro-batch, a cost that grows with tokens and not with model size. This module replaces that
fallback with the same computation over chunks of rows (same maths, same dtype handling, bounded
peak memory). Loaded into verl's workers through the public ``model.external_lib`` hook
(``model.external_lib=recipe.retool.perf.verl_perf``); it changes nothing when flash-attn is installed.
Remove when verl's fallback is vectorised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from verl.utils import torch_functional as _tf

CHUNK_ROWS = 1024  # rows of logits per kernel: ~0.6 GB of fp32 temporaries at a 152k vocabulary


def logprobs_from_logits_chunked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    parts = []
    for start in range(0, flat.shape[0], CHUNK_ROWS):
        rows, idx = flat[start : start + CHUNK_ROWS], flat_labels[start : start + CHUNK_ROWS].unsqueeze(-1)
        if rows.dtype in (torch.float32, torch.float64):
            parts.append(torch.gather(rows, -1, idx).squeeze(-1) - torch.logsumexp(rows, dim=-1))
        else:  # as verl: log_softmax for low-precision dtypes (logsumexp is unstable in bf16)
            parts.append(F.log_softmax(rows, dim=-1).gather(-1, idx).squeeze(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0)
    return out.view(labels.shape)


PATCHED = not _tf.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE  # (sic: verl's spelling)
if PATCHED:
    _tf.logprobs_from_logits_v2 = logprobs_from_logits_chunked
