"""Packed causal attention for verl's remove-padding path, without the flash-attn package.

verl's FSDP engine (``use_remove_padding``) concatenates the sequences of a micro-batch into one row
and passes their position ids; with ``flash_attention_2`` transformers finds the sequence
boundaries in the position ids and attends within each sequence through flash-attn's varlen kernel.
Without the flash-attn package the recipe has had to use SDPA, which knows no boundaries, and so one
sequence per micro-batch: many small kernels at short lengths.

This module registers ``retool_packed`` with transformers' ``AttentionInterface``: the same
boundaries, read from the position ids as transformers does for flash attention, and PyTorch's own
packed flash attention, ``torch.nn.attention.varlen.varlen_attn`` (PyTorch >= 2.10, CUDA). On CPU,
where that kernel does not exist, and on CUDA in fp32 (the flash kernels take fp16 and bf16 only), it
runs SDPA once per sequence: the reference the tests compare the packing against.

On a Hopper GPU (compute capability 9), a pack that holds a single sequence (long-context SFT: one
16k conversation per micro-batch) has no boundaries to respect, so it goes to SDPA with cuDNN's
attention kernel first in line (then SDPA's flash kernel, if cuDNN declines the shapes): on an H100
cuDNN's causal kernel runs 1.8x PyTorch's varlen flash kernel at 16k (``scripts/lab/bench_attention.py``),
which took verl's SFT step for 1.5B at 16k from 38.0% to 40.5% MFU with gradient checkpointing off,
32.6% to 35.3% with it on (scripts/lab/README.md). Elsewhere it is not measured, and cuDNN's kernel is
not faster everywhere, so other GPUs keep the varlen kernel. ``RETOOL_PACKED_CUDNN=0`` in the
trainer's environment (for GRPO, Ray's workers inherit the launching shell's) keeps every pack on the
varlen kernel. Two consequences: a sequence can meet different kernels in different passes (alone in
one micro-batch, packed with others in the next), equal to bf16 rounding; and verl's
``engine.pad_to_length`` appends a padding segment to every pack, which then never holds one sequence.

``retool.attention: auto`` (:mod:`recipe.retool.perf.attention`) selects it on CUDA machines without
flash-attn at Ulysses size 1, through ``model.external_lib=recipe.retool.perf.packed_attention`` (which
also loads ``recipe.retool.perf.verl_perf``, the recipe's default external lib) and
``+model.override_config.attn_implementation=retool_packed``; a micro-batch then holds several
sequences wherever ``max_token_len_per_gpu`` exceeds the sequence length. Not supported (each
raises): Ulysses sequence parallelism (verl's all-to-all lives in its flash-attention patch), padded
batches with an attention mask, sliding windows, attention dropout.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from recipe.retool.perf import verl_perf  # noqa: F401  (the recipe's default external lib, kept when this one replaces it)
from recipe.retool.perf.attention import cudnn_single_sequence_mode

NAME = "retool_packed"

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: CPU reference path only
    varlen_attn = None

_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()


def sequence_boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32, starts of each sequence plus the total) and the longest length.

    A sequence starts wherever the position id does not continue the previous one (a reset to 0, or
    any jump), as transformers reads packed position ids for flash attention.
    """
    pos = position_ids.reshape(-1)
    n = pos.numel()
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    cu = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), n)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if n else 0
    return cu, max_len


_last: tuple[torch.Tensor, int, torch.Tensor, int] | None = None  # (position_ids, version, cu, max_len)


def _boundaries_cached(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every layer of one forward sees the same position-id tensor: one device-to-host sync, not one per layer."""
    global _last
    if _last is not None and _last[0] is position_ids and _last[1] == position_ids._version:
        return _last[2], _last[3]
    cu, max_len = sequence_boundaries(position_ids)
    _last = (position_ids, position_ids._version, cu, max_len)
    return cu, max_len


def _check_supported(attention_mask, dropout: float, sliding_window) -> None:
    if attention_mask is not None:
        raise ValueError(f"{NAME} attention expects unpadded input (verl's use_remove_padding: one row of "
                         "concatenated sequences and their position ids), got an attention mask")
    if dropout:
        raise ValueError(f"{NAME} attention does not implement attention dropout (got {dropout})")
    if sliding_window is not None:
        raise ValueError(f"{NAME} attention does not implement sliding windows (got {sliding_window})")
    try:
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size
    except ImportError:  # outside verl
        return
    if get_ulysses_sequence_parallel_world_size() > 1:
        raise ValueError(f"{NAME} attention does not support Ulysses sequence parallelism: use "
                         "ulysses_sequence_parallel_size=1, or flash_attention_2 with the flash-attn package")


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
            scale: float | None) -> torch.Tensor:
    """(tokens, heads, dim) packed causal flash attention with PyTorch's kernel."""
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


@functools.cache
def _cudnn_preferred(device: torch.device) -> bool:
    """cuDNN's attention was measured faster than the flash kernels on Hopper (H100) only."""
    return torch.cuda.get_device_capability(device)[0] == 9


def _one_sequence_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scale: float | None, gqa: bool = False) -> torch.Tensor:
    """(1, heads, len, dim) in, (1, len, heads, dim) out: one causal sequence through SDPA, cuDNN's
    kernel first, then flash. Grouped-query heads are repeated (2 x len x heads x dim copied), the form
    measured in the trainer, unless ``gqa``: then SDPA's ``enable_gqa`` passes them as they are (also
    cuDNN's kernel in PyTorch 2.11, 8% faster on the kernel alone at 16k, ``scripts/lab/bench_attention.py``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    grouped = key.shape[1] != query.shape[1]
    if grouped and not gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION], set_priority=True):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                             enable_gqa=grouped and gqa)
    return out.transpose(1, 2).contiguous()


def _per_sequence_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                       scale: float | None) -> torch.Tensor:
    """(tokens, heads, dim) reference: SDPA over each sequence on its own."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        seq = [t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, len, dim)
        o = F.scaled_dot_product_attention(*seq, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             sliding_window: int | None = None, position_ids: torch.Tensor | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: (batch, heads, len, dim) in, (batch, len, heads, dim) out.

    One row of packed sequences (batch 1) with ``position_ids``: attention within each sequence.
    Without position ids (or with batch > 1), every row is one causal sequence.
    """
    _check_supported(attention_mask, dropout, sliding_window)
    batch, _, length, _ = query.shape
    if position_ids is None or batch != 1:
        o = F.scaled_dot_product_attention(query, key, value, is_causal=length > 1, scale=scaling,
                                           enable_gqa=key.shape[1] != query.shape[1])
        return o.transpose(1, 2).contiguous(), None
    if position_ids.dim() == 3:  # multimodal rope (3, 1, len): the text position is the first row
        position_ids = position_ids[0]
    cu, max_len = _boundaries_cached(position_ids)
    # the fast kernels take half precision only; fp32 compute (a numerics check) goes per sequence
    fast = _on_gpu(query) and query.dtype in (torch.float16, torch.bfloat16)
    if fast and cu.numel() == 2 and length > 1 and _cudnn_preferred(query.device):
        mode = cudnn_single_sequence_mode()
        if mode != "off":
            return _one_sequence_sdpa(query, key, value, scaling, gqa=mode == "gqa"), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if fast and varlen_attn is not None:
        out = _varlen(q, k, v, cu.to(q.device), max_len, scaling)
    else:
        out = _per_sequence_sdpa(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``attn_implementation="retool_packed"`` known to transformers in this process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, packed_attention_forward)
    # masks as for flash attention: none for unpadded input (boundaries come from the position ids)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)


register()
