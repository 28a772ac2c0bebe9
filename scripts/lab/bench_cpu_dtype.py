"""What bf16 costs on this CPU, against fp32, natively and with bf16 instructions taken away.

    python scripts/lab/bench_cpu_dtype.py [--threads 2] [--steps 10]

Side by side in one run, each in its own process: a 512×512 matrix product (GFLOP/s) and one
training step (forward + backward, AdamW) of the miniature's model shape (random-init Qwen2, hidden
256, 2 layers; 8 sequences of 300 tokens, as the miniature's SFT micro-batches) in fp32 and in bf16
autocast, first as this CPU runs them, then with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``:
bf16 products emulated, as on a CPU without AVX512-BF16 or AMX). It also prints what
:mod:`recipe.retool.perf.precision` decides in each setting. The miniature itself computes in fp32
everywhere, so its speed does not depend on native bf16; this shows what a bf16 config would cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def measure(threads: int, steps: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recipe.retool.perf.precision import CpuBf16

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "decision": CpuBf16.probe().reason,
                 "native": CpuBf16.probe().native}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        for _ in range(3):
            a @ b
        n, started = 20, time.perf_counter()
        for _ in range(n):
            a @ b
        out[f"matmul {name} GFLOP/s"] = 2 * 512**3 * n / (time.perf_counter() - started) / 1e9
    cfg = Qwen2Config(vocab_size=813, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    ids = torch.randint(0, 813, (8, 300))
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = Qwen2ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, dtype=dtype):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()

        step()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        out[f"train step {name} s"] = (time.perf_counter() - started) / steps
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.threads, a.steps)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {a.threads} threads")
    rows = []
    for label, extra in (("as is", {}), ("oneDNN capped at AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"})):
        env = {**os.environ, **extra}
        env.pop("RETOOL_CPU_BF16", None)
        res = subprocess.run([sys.executable, __file__, "--child", "--threads", str(a.threads), "--steps", str(a.steps)],
                             env=env, capture_output=True, text=True, check=True)
        rows.append((label, json.loads(res.stdout.strip().splitlines()[-1])))
    print(f"{'setting':<24} {'matmul fp32':>12} {'matmul bf16':>12} {'step fp32':>10} {'step bf16':>10} {'bf16/fp32':>10}"
          "  native bf16 (recipe.retool.perf.precision)")
    for label, r in rows:
        ratio = r["train step bf16 s"] / r["train step fp32 s"]
        print(f"{label:<24} {r['matmul fp32 GFLOP/s']:>8.1f} GF/s {r['matmul bf16 GFLOP/s']:>7.1f} GF/s "
              f"{r['train step fp32 s']:>9.3f}s {r['train step bf16 s']:>9.3f}s {ratio:>9.1f}x  "
              f"{'yes' if r['native'] else 'no'} ({r['decision']})")


if __name__ == "__main__":
    main()
