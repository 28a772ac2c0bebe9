"""Estimate the GPU time (and cost) of the full recipe: SFT on ReTool-SFT, then GRPO, on 8 GPUs.

    python -m recipe.retool.cloud.cost_estimate [--grpo-steps 400] [--usd-per-gpu-hour 3.0] [--rollout-tok-s 8000] ...

Batch sizes, lengths, epochs, samples per prompt, GPU count and validation frequency come from the
recipe's own configs (``retool_sft.yaml``, ``retool_grpo_template.yaml``, read with OmegaConf); the
model shape is Qwen2.5-7B-Instruct's. What the estimate rests on, and where each number comes from:

- ``--peak-tflops`` 796: the bf16 matrix-product rate measured on an H100 (scripts/lab/README.md);
- ``--train-mfu`` 0.33: the MFU measured for verl's SFT trainer with our configs (``retool.kernels:
  auto``: fused log-probs + Liger, gradient checkpointing on) on one H100: 33.1% at 16k (1.5B), 40.5%
  at 4k (3B), scripts/lab/README.md; the lower one is used for SFT and for GRPO's log-prob and update
  phases (the same FSDP engine; not measured in the GRPO trainer itself). cuDNN attention for
  one-sequence packs (35.3% at 16k) does not apply: the recipe's packs hold several sequences;
- ``--sft-conversations`` 2000 and ``--sft-mean-tokens`` 1800: ReTool-SFT is ``train_2000.parquet``;
  the mean length is an assumption: measure it with the prefilter's token counts and pass it;
- ``--mean-response-tokens`` 3000 and ``--mean-prompt-tokens`` 250: assumptions for DAPO-Math prompts
  and multi-turn responses under the template's 4096-token response budget;
- ``--rollout-tok-s`` 8000: generated tokens/s per GPU for a 7B model in SGLang or vLLM at GRPO's
  batch sizes — an assumption, NOT measured here (our GPU runs used a tiny model); the sensitivity
  table shows what other values give;
- ``--step-overhead-s`` 15: weight sync, checkpoint and scheduling per step (assumption; measured
  0.5 s for a tiny model, so this is for a 7B model's 15 GB of weights).

Training FLOPs per token follow scripts/lab/gpu_sft_proof.py's MFU convention: 6·N for the matrix
products plus causal attention; GRPO spends 2·N (+attention) on each forward-only pass (the actor's
old log-probs, the reference) and 8·N on the update (forward, recomputed forward, backward).
"""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from recipe.retool import CONFIG_DIR

CONFIG = CONFIG_DIR
# Qwen2.5-7B-Instruct: parameters, layers, hidden size
MODEL_7B = {"params": 7.62e9, "layers": 28, "hidden": 3584}


def attention_flops(model: dict, context: float) -> float:
    """Causal attention FLOPs per token for a forward and backward pass at mean context ``context/2``."""
    return 12 * model["layers"] * model["hidden"] * context / 2


def fsdp_rate(args, gpus_per_node: int, nodes: int) -> float:
    """FLOP/s of the FSDP passes over the whole cluster: each GPU at the training MFU, times the
    cross-node efficiency when the parameter all-gathers and gradient reduce-scatters leave the node."""
    return args.train_mfu * args.peak_tflops * 1e12 * gpus_per_node * nodes * (
        args.cross_node_efficiency if nodes > 1 else 1.0)


def sft_hours(args, sft, model, nodes: int) -> tuple[float, float]:
    epochs = sft.trainer.total_epochs
    tokens = args.sft_conversations * args.sft_mean_tokens * epochs
    flops = tokens * (6 * model["params"] + attention_flops(model, args.sft_mean_tokens))
    hours = flops / fsdp_rate(args, sft.trainer.n_gpus_per_node, nodes) / 3600
    return hours, tokens


def grpo_step_s(args, grpo, model, rollout_tok_s: float, nodes: int) -> dict[str, float]:
    """Seconds of each phase of one step. Generation scales with the GPU count (each node's
    replicas decode on their own); the FSDP passes with :func:`fsdp_rate`; the per-step overhead
    (weight sync, checkpoint, scheduling) is taken as constant."""
    gpus = grpo.trainer.n_gpus_per_node * nodes
    trajectories = grpo.data.train_batch_size * grpo.actor_rollout_ref.rollout.n
    seq = args.mean_prompt_tokens + args.mean_response_tokens
    generated = trajectories * args.mean_response_tokens
    # validation every test_freq steps: the AIME set x its own n, amortised per step
    val = grpo.actor_rollout_ref.rollout.val_kwargs.n * args.val_problems * args.mean_response_tokens
    val_per_step = val / max(1, grpo.trainer.test_freq)
    tokens = trajectories * seq
    fwd = 2 * model["params"] + attention_flops(model, seq) / 3
    rate = fsdp_rate(args, grpo.trainer.n_gpus_per_node, nodes)
    return {
        "gen": (generated + val_per_step) / (rollout_tok_s * gpus),
        "old_log_prob + ref": 2 * tokens * fwd / rate,
        "update_actor": tokens * (8 * model["params"] + 4 * attention_flops(model, seq) / 3) / rate,
        "overhead": args.step_overhead_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.cloud.cost_estimate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpo-steps", type=int, default=400, help="GRPO steps (the ReTool paper trains 400)")
    p.add_argument("--peak-tflops", type=float, default=796.0)
    p.add_argument("--train-mfu", type=float, default=0.33)
    p.add_argument("--sft-conversations", type=int, default=2000)
    p.add_argument("--sft-mean-tokens", type=float, default=1800)
    p.add_argument("--mean-prompt-tokens", type=float, default=250)
    p.add_argument("--mean-response-tokens", type=float, default=3000)
    p.add_argument("--val-problems", type=int, default=30, help="AIME-2024")
    p.add_argument("--rollout-tok-s", type=float, default=8000.0, help="generated tokens/s per GPU (assumption)")
    p.add_argument("--step-overhead-s", type=float, default=15.0)
    p.add_argument("--nodes", type=int, default=None,
                   help="nodes of the template's n_gpus_per_node GPUs (default: the template's trainer.nnodes)")
    p.add_argument("--cross-node-efficiency", type=float, default=0.85,
                   help="share of the per-GPU FSDP rate kept when the collectives cross nodes (assumption)")
    p.add_argument("--usd-per-gpu-hour", type=float, default=None, help="your provider's price, for a cost line")
    args = p.parse_args()

    sft = OmegaConf.load(CONFIG / "retool_sft.yaml")
    grpo = OmegaConf.load(CONFIG / "retool_grpo_template.yaml")
    model = MODEL_7B
    nodes = args.nodes or grpo.trainer.nnodes
    gpus = grpo.trainer.n_gpus_per_node * nodes
    print(f"model: 7.6B (Qwen2.5-7B shape); {gpus} GPUs ({nodes} node(s) of {grpo.trainer.n_gpus_per_node}); "
          f"peak {args.peak_tflops:.0f} TFLOP/s, training MFU {args.train_mfu:.0%}"
          + (f", {args.cross_node_efficiency:.0%} of it across nodes" if nodes > 1 else ""))

    s_hours, s_tokens = sft_hours(args, sft, model, nodes)
    print(f"\nSFT: {args.sft_conversations} conversations x {args.sft_mean_tokens:.0f} tokens x "
          f"{sft.trainer.total_epochs} epochs = {s_tokens / 1e6:.1f} M tokens -> {s_hours * 60:.1f} min "
          f"({s_hours * gpus:.2f} GPU-hours)")

    phases = grpo_step_s(args, grpo, model, args.rollout_tok_s, nodes)
    step = sum(phases.values())
    traj = grpo.data.train_batch_size * grpo.actor_rollout_ref.rollout.n
    print(f"\nGRPO step ({grpo.data.train_batch_size} prompts x {grpo.actor_rollout_ref.rollout.n} samples = "
          f"{traj} trajectories of ~{args.mean_prompt_tokens + args.mean_response_tokens:.0f} tokens):")
    for name, sec in phases.items():
        print(f"  {name:20s} {sec:7.1f} s  ({sec / step:4.0%})")
    g_hours = step * args.grpo_steps / 3600
    print(f"  {'step':20s} {step:7.1f} s -> {args.grpo_steps} steps: {g_hours:.1f} h ({g_hours * gpus:.0f} GPU-hours)")

    print(f"\nsensitivity to the rollout rate ({args.grpo_steps} GRPO steps, SFT included):")
    print(f"  {'tok/s per GPU':>14s} {'step s':>8s} {'hours':>7s} {'GPU-hours':>10s}"
          + (f" {'USD':>8s}" if args.usd_per_gpu_hour else ""))
    for rate in (2000, 4000, 8000, 16000):
        st = sum(grpo_step_s(args, grpo, model, rate, nodes).values())
        hours = s_hours + st * args.grpo_steps / 3600
        usd = f" {hours * gpus * args.usd_per_gpu_hour:8.0f}" if args.usd_per_gpu_hour else ""
        print(f"  {rate:14.0f} {st:8.1f} {hours:7.1f} {hours * gpus:10.0f}{usd}")
    print(f"\nscaling over nodes of {grpo.trainer.n_gpus_per_node} GPUs ({args.rollout_tok_s:.0f} tok/s per GPU, "
          f"{args.cross_node_efficiency:.0%} FSDP efficiency across nodes):")
    print(f"  {'nodes':>6s} {'GPUs':>5s} {'step s':>8s} {'speed-up':>9s} {'hours':>7s} {'GPU-hours':>10s}"
          + (f" {'USD':>8s}" if args.usd_per_gpu_hour else ""))
    one_node = sum(grpo_step_s(args, grpo, model, args.rollout_tok_s, 1).values())
    for n in (1, 2, 4):
        st = sum(grpo_step_s(args, grpo, model, args.rollout_tok_s, n).values())
        hours = sft_hours(args, sft, model, n)[0] + st * args.grpo_steps / 3600
        g = grpo.trainer.n_gpus_per_node * n
        usd = f" {hours * g * args.usd_per_gpu_hour:8.0f}" if args.usd_per_gpu_hour else ""
        print(f"  {n:6d} {g:5d} {st:8.1f} {one_node / st:8.2f}x {hours:7.1f} {hours * g:10.0f}{usd}")
    if args.usd_per_gpu_hour:
        total = (s_hours + g_hours) * gpus
        print(f"\ntotal at {args.rollout_tok_s:.0f} tok/s per GPU: {total:.0f} GPU-hours, "
              f"about ${total * args.usd_per_gpu_hour:,.0f} at ${args.usd_per_gpu_hour}/GPU-hour")


if __name__ == "__main__":
    main()
