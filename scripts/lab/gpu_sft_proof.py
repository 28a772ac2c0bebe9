"""Prove the SFT path on a GPU and measure it: verl's real SFT trainer with our config.

    python scripts/lab/gpu_sft_proof.py --out OUT [--shape 0.5b] [--seq-len 4096] [--steps 6] [--gpus 1] [--sp 1]
                                    [--attn auto|sdpa|retool_packed|flash_attention_2] [--pack N]

1. measures the GPU's bf16 matmul peak (8192³, mean of 10 after warm-up);
2. builds a Qwen2-architecture model with random weights at the given shape (no hub) and the
   offline dev tokenizer;
3. writes a synthetic multi-turn tool-calling SFT parquet whose conversations are ``--seq-len``
   tokens long (our SFT schema, as ``recipe.retool.data`` writes it);
4. runs ``python -m recipe.retool.train sft`` (torchrun, FSDP2 engine, bf16, gradient
   checkpointing, dynamic batch) for ``--steps`` steps with a checkpoint at the end, reads each
   step's time from the trainer's log lines, and reports tokens/s and MFU = 6·N·tokens/s (plus
   attention) / measured peak;
5. resumes from that checkpoint for two more steps, and merges the last one to Hugging Face
   format with verl's model merger, loading the result to check it.

``--attn`` picks the attention (``auto``: flash_attention_2 with the flash-attn package, else SDPA);
``--pack N`` lets a micro-batch hold N sequences (``data.max_token_len_per_gpu`` = N × length), which
needs attention that respects sequence boundaries (``retool_packed`` or ``flash_attention_2``). Runs
into the same OUT reuse its model and data (same weights, same conversations), each variant with its
own checkpoint directory, so their per-step losses can be compared.

Prints a JSON summary and writes it to OUT/summary-<shape>-<length>-<attn>-pack<N>.json. Needs verl 0.9.1 importable (see
scripts/lab/gpu_wheels.sh for machines without internet).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # Qwen2.5 shapes: hidden, layers, heads, kv heads, intermediate, vocab
    "0.5b": (896, 24, 14, 2, 4864, 151936),
    "1.5b": (1536, 28, 12, 2, 8960, 151936),
    "3b": (2048, 36, 16, 2, 11008, 151936),
    "7b": (3584, 28, 28, 4, 18944, 152064),
}


def measure_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    return 2 * 8192**3 / seconds / 1e12


def build_model(out: Path, shape: str) -> tuple[Path, int, tuple]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recipe.retool.dev.tokenizer import build_dev_tokenizer

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    if (out / "config.json").exists():  # an earlier variant's model: same weights for a fair comparison
        return out, _count_params(out), SHAPES[shape]
    tok = build_dev_tokenizer()
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=32768,
                      tie_word_embeddings=shape in ("0.5b", "1.5b", "3b"), torch_dtype="bfloat16",
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out, n_params, SHAPES[shape]


def _count_params(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())


def reference_step(model_dir: Path, seq_len: int, checkpointing: bool, attn: str) -> float | str:
    """Plain PyTorch/transformers fwd+bwd of the same model on one seq_len sequence, bf16 weights:
    the ceiling verl's trainer is compared against (returns model TFLOP/s, 6·N per token, or "oom")."""
    import torch

    try:
        return _reference_step(model_dir, seq_len, checkpointing, attn)
    except torch.OutOfMemoryError:  # e.g. no checkpointing at 16k: the comparison point is missing, not the run
        torch.cuda.empty_cache()
        return "oom"


def _reference_step(model_dir: Path, seq_len: int, checkpointing: bool, attn: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.bfloat16,
                                                 attn_implementation=attn).cuda()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 1000, (1, seq_len), device="cuda")
    n = sum(p.numel() for p in model.parameters())
    for i in range(5):
        if i == 2:
            torch.cuda.synchronize()
            t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 3
    del model
    torch.cuda.empty_cache()
    return 6 * n * seq_len / dt / 1e12


def build_data(out: Path, tokenizer_dir: Path, seq_len: int, rows: int) -> Path:
    """Long multi-turn tool-calling conversations (our SFT schema) of about seq_len tokens."""
    from transformers import AutoTokenizer

    from recipe.retool.data import load_code_tool_schema, write_parquet

    path = out / "sft" / "train.parquet"
    if path.exists():  # an earlier variant's data
        return path.parent.parent
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    schema = load_code_tool_schema()
    words = "we compute the sum of divisors then check the remainder modulo the prime and simplify".split()
    out_rows = []
    for i in range(rows):
        filler = " ".join(words[(i + j) % len(words)] for j in range(64))
        msgs = [{"role": "user", "content": f"Problem {i}: find the value."}]
        while True:
            msgs += [{"role": "assistant", "content": filler, "tool_calls": [{"type": "function", "function": {
                "name": "code_interpreter", "arguments": {"code": f"print({i} * 2)"}}}]},
                     {"role": "tool", "content": str(i * 2)}]
            n = len(tok.apply_chat_template(msgs + [{"role": "assistant", "content": "x"}], tools=[schema],
                                            tokenize=True)["input_ids"])
            if n > seq_len - 200:
                break
        msgs.append({"role": "assistant", "content": f"The answer is \\boxed{{{i * 2}}}.", "tool_calls": []})
        out_rows.append({"messages": msgs, "tools": [schema], "data_source": "synthetic", "extra_info": {"index": i}})
    write_parquet(out_rows, path)
    return path.parent.parent


def _configured_external_lib() -> str:
    """The SFT config's own model.external_lib (kept when the profiler module is added to it)."""
    from omegaconf import OmegaConf

    from recipe.retool.train import CONFIG_DIR

    return OmegaConf.load(CONFIG_DIR / "retool_sft.yaml").model.external_lib


def run_sft(model: Path, data: Path, ckpt: Path, steps: int, seq_len: int, batch: int, log: Path,
            extra: list[str], gpus: int = 1, sp: int = 1, pack: int = 1, exclude_from: int | None = None,
            env: dict | None = None) -> dict:
    """Runs verl's SFT trainer; steps from ``exclude_from`` on (a profiled step) are left out of the timing.
    A step's time is when its metrics reach verl's metrics file (read after each console line)."""
    from recipe.retool.metrics import MetricsTail, metrics_path
    from recipe.retool.stages import run_dir, train_command

    overrides = [
        f"trainer.n_gpus_per_node={gpus}", f"engine.ulysses_sequence_parallel_size={sp}", f"data.max_length={seq_len}",
        f"data.max_token_len_per_gpu={seq_len * pack}", f"data.train_batch_size={batch}", "data.micro_batch_size_per_gpu=1",
        f"trainer.total_training_steps={steps}", f"trainer.save_freq={steps}", "trainer.logger=[console,file]",
        "data.num_workers=2", *extra,
    ]
    cmd = train_command("sft", str(model), data, ckpt, "gpu-proof", "retool_sft", overrides, python=sys.executable)
    print("$", " ".join(cmd), flush=True)
    metrics = MetricsTail(metrics_path(run_dir(ckpt, "sft", "gpu-proof")))
    times, tokens, losses = {}, {}, {}
    start = time.perf_counter()
    with log.open("a") as fh, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env={**os.environ, **(env or {})}) as p:
        for line in p.stdout:
            fh.write(line)
            fh.flush()  # so that a profiler waiting for a step line sees it while training runs
            for step, m in metrics.new():
                times[step], tokens[step] = time.perf_counter(), int(m.get("train/global_tokens", 0))
                if "train/loss" in m:
                    losses[step] = m["train/loss"]
                print(f"  step {step}: {tokens[step]} tokens", flush=True)
    if p.returncode != 0:
        raise SystemExit(f"SFT failed with exit code {p.returncode}; log: {log}")
    ordered = sorted(times)
    timed = [s for s in ordered if exclude_from is None or s < exclude_from]
    steady = timed[1:] if len(timed) > 2 else timed  # the first step includes warm-up
    dts = [times[s] - times[prev] for prev, s in zip(steady, steady[1:], strict=False)]
    toks = [tokens[s] for s in steady[1:]]
    return {"steps_logged": ordered, "wall_s": time.perf_counter() - start, "losses": losses,
            "step_time_s": sum(dts) / len(dts) if dts else None,
            "tokens_per_s": sum(toks) / sum(dts) if dts else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4, help="conversations per step")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this machine to train on (FSDP across them)")
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel size")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--skip-reference", action="store_true", help="no plain-PyTorch reference steps")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "retool_packed", "flash_attention_2"],
                   help="attention implementation (auto: as retool.attention=auto picks, recipe/retool/perf/attention.py)")
    p.add_argument("--pack", type=int, default=1, help="sequences per micro-batch (needs retool_packed or flash_attention_2)")
    p.add_argument("--reference-only", action="store_true", help="only the plain-PyTorch reference step")
    p.add_argument("--extra", nargs="*", default=[], help="more verl overrides")
    p.add_argument("--tag", default="", help="name of this variant (its log, checkpoint and summary file)")
    p.add_argument("--profile", type=int, metavar="STEP", help="profile optimizer step STEP in the trainer "
                   "(recipe/retool/dev/step_profiler.py; left out of the timing): GPU time by kernel family")
    p.add_argument("--drop-checkpoint", action="store_true", help="delete the run's checkpoint at the end (disk)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    attn = args.attn
    if attn == "auto":  # as the recipe's retool.attention=auto picks
        from recipe.retool.perf.attention import Environment, choose

        choice = choose("auto", args.sp, Environment.probe())
        if choice.problem:
            p.error(choice.problem)
        attn = choice.implementation
    if args.pack > 1 and attn == "sdpa":
        p.error("--pack > 1 needs attention that keeps sequences apart: --attn retool_packed or flash_attention_2")
    summary: dict = {"shape": args.shape, "seq_len": args.seq_len, "batch": args.batch, "gpus": args.gpus, "sp": args.sp,
                     "attn": attn, "pack": args.pack}
    summary["peak_bf16_tflops"] = round(measure_peak_tflops(), 1)
    model, n_params, (hidden, layers, *_rest) = build_model(out / f"model-{args.shape}", args.shape)
    summary["params"] = n_params
    data = build_data(out / f"data-{args.seq_len}", model, args.seq_len, rows=args.batch * (args.steps + 4))
    extra = list(args.extra)
    if attn != "flash_attention_2":  # verl's default
        from recipe.retool.perf.attention import implementation_overrides

        extra += implementation_overrides("model", attn, new_key=True)
    tag = f"{args.shape}-{args.seq_len}-{attn}-pack{args.pack}" + (f"-{args.tag}" if args.tag else "")
    env = {}
    if args.profile:
        if args.profile >= args.steps:
            p.error("--profile STEP must be below --steps (the last step also writes the checkpoint)")
        libs = [o.split("=", 1)[1] for o in extra if o.startswith("model.external_lib=")] or [_configured_external_lib()]
        extra = [o for o in extra if not o.startswith("model.external_lib=")]
        extra.append(f"model.external_lib=[{libs[-1]},recipe.retool.dev.step_profiler]")
        env = {"RETOOL_PROFILE_DIR": str(out / f"profile-{tag}"), "RETOOL_PROFILE_STEP": str(args.profile)}
    summary["overrides"] = extra
    summary["reference_tflops"] = {}
    for c in (() if args.skip_reference else (False, True)):
        tflops = reference_step(model, args.seq_len, c, "sdpa" if attn == "retool_packed" else attn)
        summary["reference_tflops"][f"{attn}, checkpointing={c}"] = tflops if tflops == "oom" else round(tflops, 1)
    print("reference:", summary["reference_tflops"], flush=True)
    if args.reference_only:
        print(json.dumps(summary, indent=2))
        return
    log = out / f"sft-{tag}.log"
    ckpt = out / f"ckpt-{tag}"
    run = run_sft(model, data, ckpt, args.steps, args.seq_len, args.batch, log, extra, args.gpus, args.sp, args.pack,
                  exclude_from=args.profile, env=env)
    summary["run"] = run
    if args.profile and (prof := out / f"profile-{tag}" / "profile-rank0.json").exists():
        summary["profile"] = json.loads(prof.read_text())
    if run["tokens_per_s"]:
        # training FLOPs per token: 6·N for the matmuls + 12·layers·hidden·seq for causal attention (fwd+bwd)
        flops_per_token = 6 * n_params + 12 * layers * hidden * args.seq_len / 2
        achieved = run["tokens_per_s"] * flops_per_token / 1e12
        summary["model_tflops"] = round(achieved, 1)
        summary["tokens_per_s_per_gpu"] = round(run["tokens_per_s"] / args.gpus, 1)
        summary["mfu"] = round(achieved / (summary["peak_bf16_tflops"] * args.gpus), 4)
    exp_dir = ckpt / "sft-experiments" / "gpu-proof"
    summary["checkpoints"] = sorted(p.name for p in exp_dir.glob("global_step_*"))
    if not args.skip_resume:
        resumed = run_sft(model, data, ckpt, args.steps + 2, args.seq_len, args.batch, log, extra, args.gpus, args.sp,
                          args.pack)
        summary["resume"] = {"steps_logged": resumed["steps_logged"],
                             "resumed_from_checkpoint": min(resumed["steps_logged"] or [0]) == args.steps + 1}
        last = exp_dir / f"global_step_{args.steps + 2}"
        merged = out / "merged_hf"
        from recipe.retool.stages import merge_command

        subprocess.run(merge_command(last, merged, python=sys.executable), check=True)
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(merged))
        summary["merged"] = {"path": str(merged), "params": sum(p.numel() for p in m.parameters()),
                             "matches": sum(p.numel() for p in m.parameters()) == n_params}
    if args.drop_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    (out / f"summary-{tag}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
