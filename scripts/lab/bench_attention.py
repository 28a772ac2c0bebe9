"""Causal attention kernels the trainer can reach without the flash-attn package, side by side on one GPU.

    python scripts/lab/bench_attention.py [--lengths 4096 12345 16384] [--heads 12] [--kv-heads 2] [--dim 128] [--iters 10]

For one sequence of each length (bf16, Qwen2.5-1.5B's heads by default), times forward and backward
of:

- ``varlen``: PyTorch's packed flash kernel (``torch.nn.attention.varlen.varlen_attn``), what
  ``retool_packed`` runs for packs of several sequences;
- ``sdpa_flash``: SDPA restricted to its flash backend (grouped-query heads through ``enable_gqa``);
- ``cudnn``: ``retool_packed``'s path for a one-sequence pack (SDPA, cuDNN first, heads repeated);
- ``cudnn_gqa``: SDPA restricted to cuDNN with ``enable_gqa`` (reported as refused where cuDNN
  does not take it).

Prints, per kernel, milliseconds and TFLOP/s (causal: forward 2·L²·heads·dim, backward 2.5x that),
the speed-up over ``varlen``, the largest difference of the output and the gradients from
``varlen``'s (and, up to 4k, from an fp32 reference), whether every gradient is finite, and the
attention kernels the profiler saw (so that a silent fallback to another backend shows). A length
that is not a multiple of the kernels' tiles (12345 by default) checks the partly filled last tile.
Needs CUDA and PyTorch >= 2.10.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recipe.retool.dev.step_profiler import _device_kernels, family  # noqa: E402
from recipe.retool.perf import packed_attention  # noqa: E402

REFERENCE_MAX_LEN = 4096  # the fp32 reference materialises len² scores per head


def _varlen(q, k, v):
    """(1, heads, len, dim) in and out, through the packed kernel with one sequence."""
    cu = torch.tensor([0, q.shape[2]], dtype=torch.int32, device=q.device)
    out = packed_attention._varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, q.shape[2], None)
    return out.transpose(0, 1)[None]


def _sdpa(backend, gqa_native: bool):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        if not gqa_native and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return run


def _cudnn(q, k, v):
    return packed_attention._one_sequence_sdpa(q, k, v, None).transpose(1, 2)


def kernels() -> dict:
    from torch.nn.attention import SDPBackend

    return {"varlen": _varlen, "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION, True), "cudnn": _cudnn,
            "cudnn_gqa": _sdpa(SDPBackend.CUDNN_ATTENTION, True)}


def _inputs(length: int, heads: int, kv_heads: int, dim: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, length, dim, device="cuda", dtype=dtype, generator=g)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, heads, length, dim, device="cuda", dtype=dtype, generator=g)
    return q, k, v, grad


def _fwd_bwd(fn, q, k, v, grad):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), (q.grad, k.grad, v.grad)


def _time(fn, q, k, v, grad, iters: int) -> tuple[float, float]:
    """Mean forward and backward milliseconds (CUDA events) after warm-up."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    for _ in range(3):
        fn(q, k, v).backward(grad)
    fwd = bwd = 0.0
    for _ in range(iters):
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        out = fn(q, k, v)
        e[1].record()
        out.backward(grad)
        e[2].record()
        torch.cuda.synchronize()
        fwd += e[0].elapsed_time(e[1])
        bwd += e[1].elapsed_time(e[2])
    return fwd / iters, bwd / iters


def _kernel_names(fn, q, k, v, grad) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _fwd_bwd(fn, q, k, v, grad)
        torch.cuda.synchronize()
    return sorted({name[:90] for name, _, _ in _device_kernels(prof) if family(name) == "attention"})


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def bench(length: int, heads: int, kv_heads: int, dim: int, iters: int) -> dict:
    q, k, v, grad = _inputs(length, heads, kv_heads, dim)
    fwd_flops = 2 * length**2 * heads * dim
    base_out, base_grads = _fwd_bwd(_varlen, q, k, v, grad)  # the kernel every row is compared with
    ref = None
    if length <= REFERENCE_MAX_LEN:
        from torch.nn.attention import SDPBackend

        ref = _fwd_bwd(_sdpa(SDPBackend.MATH, True), *(t.float() for t in (q, k, v, grad)))
    rows, base_ms = {}, sum(_time(_varlen, q, k, v, grad, iters))
    for name, fn in kernels().items():
        try:
            out, grads = _fwd_bwd(fn, q, k, v, grad)
            fwd_ms, bwd_ms = _time(fn, q, k, v, grad, iters)
        except RuntimeError as err:  # a backend that does not take these inputs
            rows[name] = {"refused": str(err).splitlines()[0][:200]}
            continue
        total = fwd_ms + bwd_ms
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
        row = {"finite": finite, "fwd_ms": round(fwd_ms, 3), "bwd_ms": round(bwd_ms, 3),
               "tflops": round(3.5 * fwd_flops / (total / 1e3) / 1e12, 1), "speedup_vs_varlen": round(base_ms / total, 3),
               "max_diff_vs_varlen": {"out": _max_diff(out, base_out),
                                      "grads": max(_max_diff(a, b) for a, b in zip(grads, base_grads, strict=True))},
               "attention_kernels": _kernel_names(fn, q, k, v, grad)}
        if ref is not None:
            row["max_diff_vs_fp32"] = {"out": _max_diff(out, ref[0]),
                                       "grads": max(_max_diff(a, b) for a, b in zip(grads, ref[1], strict=True))}
        rows[name] = row
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/lab/bench_attention.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 12345, 16384])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or packed_attention.varlen_attn is None:
        p.error("needs a CUDA GPU and PyTorch >= 2.10 (torch.nn.attention.varlen)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"{args.heads} heads / {args.kv_heads} kv heads x {args.dim}, bf16, causal, forward + backward")
    results = {}
    for length in args.lengths:
        results[length] = bench(length, args.heads, args.kv_heads, args.dim, args.iters)
        print(f"\nlength {length}")
        print(f"  {'kernel':<11} {'fwd ms':>8} {'bwd ms':>8} {'TFLOP/s':>8} {'x varlen':>9} {'diff out':>9} {'diff grad':>9} "
              f"{'finite':>6}  kernels")
        for name, row in results[length].items():
            if "refused" in row:
                print(f"  {name:<11} refused: {row['refused']}")
                continue
            d = row["max_diff_vs_varlen"]
            print(f"  {name:<11} {row['fwd_ms']:>8.2f} {row['bwd_ms']:>8.2f} {row['tflops']:>8.1f} "
                  f"{row['speedup_vs_varlen']:>9.2f} {d['out']:>9.2e} {d['grads']:>9.2e} {str(row['finite']):>6}  "
                  f"{', '.join(row['attention_kernels'])}")
            if "max_diff_vs_fp32" in row:
                print(f"  {'':<11} vs fp32 reference: out {row['max_diff_vs_fp32']['out']:.2e}, "
                      f"grads {row['max_diff_vs_fp32']['grads']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
