"""Miniature GRPO, end to end: verl's real ``main_ppo`` with our template, tool, sandbox and reward.

    python scripts/lab/mini_grpo.py --out OUT [--device cpu|gpu] [--steps N] [--attention sdpa|retool_packed]
                                [--no-teach] [--shape tiny|0.5b|1.5b|3b|7b] [--skip-resume] [--sandbox-url URL]
                                [--extra OVERRIDE ...]

1. builds a tiny random-init Qwen2 model with the offline dev tokenizer, then teaches it by
   teacher forcing (``--teach-steps`` Adam steps on the RL prompts) to open its answer with a
   ``code_interpreter`` call, so that rollouts exercise the tool path (a random model never emits
   one); ``--no-teach`` skips that;
2. prepares the bundled sample data with the real data stage and starts our sandbox server;
3. runs ``python -m recipe.retool.train grpo … --config recipe/retool/dev/config/retool_grpo_debug[_cpu].yaml``
   (rollouts by the
   transformers ``hf_dev`` backend) for ``--steps`` steps, saving a checkpoint at the end;
4. runs it again with one more step: verl resumes from that checkpoint and trains the next step;
5. prints a JSON summary (also OUT/summary.json): per-step time and where it goes (generation vs
   log-prob/ref/update/weight sync), score, turns, how far the rollout's log-probs are from the
   actor's, the code runs our sandbox served, and the resumed step.

``--shape 1.5b`` (GPU only) trains a random-init model of a Qwen2.5 shape (full 152k vocabulary, as
``scripts/lab/gpu_sft_proof.py`` builds it) instead of the tiny one: with ``--no-teach`` its rollouts
are random tokens up to ``data.max_response_length``, which makes fixed-size batches for timing the
actor's phases (``old_log_prob``, ``ref``, ``update_actor``) under different kernels; the summary's
``phases`` are their means over the steps after the first. ``--skip-resume`` runs only the first
run, without a checkpoint.

Progress goes to the console as it happens (each stage, the teaching loss, every GRPO step with
its time and score); verl's full output goes to OUT/run1.log and OUT/run2.log. Exits non-zero if a
run fails or the resume did not happen. CPU needs nothing but this repo's install; a GPU machine
needs verl importable (see scripts/lab/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sft_proof import SHAPES, build_model  # noqa: E402

REPLY = '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}\n</tool_call>'
KEYS = ["timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/ref", "timing_s/update_actor",
        "timing_s/update_weights", "timing_s/save_checkpoint", "critic/score/mean", "critic/score/max",
        "num_turns/mean", "response_length/mean", "actor/grad_norm", "actor/pg_loss",
        "training/rollout_probs_diff_max", "training/rollout_actor_probs_pearson_corr",
        "reward/verify_timeouts"]
SERVER_LINE = re.compile(r"hf_dev server stats: (\{.*\})")
PID = re.compile(r"pid=(\d+)")


def teach_tool_call(model_dir: Path, data: Path, steps: int, device: str) -> dict:
    """Fine-tune the tiny model so that, after any RL prompt, it answers with REPLY (then eos)."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.retool.data import load_code_tool_schema

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    schema = load_code_tool_schema()
    reply = tok.encode(REPLY + tok.eos_token, add_special_tokens=False)
    rows = []
    for messages in pd.read_parquet(data)["prompt"]:
        prompt = tok.apply_chat_template(list(messages), tools=[schema], add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt  # a BatchEncoding in newer transformers
        rows.append((list(prompt), reply))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            progress(f"teaching the tool call: step {step}/{steps}, loss {float(loss.detach()):.4f}")
    model.eval()
    with torch.no_grad():  # greedy check on the first prompt
        out = model.generate(torch.tensor([rows[0][0]], device=device), max_new_tokens=len(reply) + 4,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    greedy = tok.decode(out[0, len(rows[0][0]):], skip_special_tokens=False)
    model.save_pretrained(model_dir)
    return {"steps": steps, "final_loss": round(float(loss.detach()), 4), "greedy_reply_is_tool_call": greedy.startswith(REPLY)}


def parse_steps(metrics_file: Path) -> dict[int, dict[str, float]]:
    """The phase timings and scores of each step, from verl's metrics file (one launch's)."""
    from recipe.retool.metrics import parse_records

    records = parse_records(metrics_file.read_text().splitlines(keepends=True), str(metrics_file)) if metrics_file.exists() else {}
    return {step: {k: v for k, v in m.items() if k in KEYS} for step, m in records.items()}


def _server_snapshots(log: str) -> dict[str, list[dict]]:
    """Each hf_dev server's cumulative stats lines, by the server's process (Ray's ``pid=`` prefix)."""
    snaps: dict[str, list[dict]] = {}
    for line in log.splitlines():
        if m := SERVER_LINE.search(line):
            pid = PID.search(line[: m.start()])
            snaps.setdefault(pid.group(1) if pid else "?", []).append(json.loads(m.group(1)))
    return snaps


def rollout_costs(log: str) -> list[dict[str, float]]:
    """Per step, what the hf_dev servers did between two weight syncs (summed over the replicas)."""
    steps: list[dict[str, float]] = []
    for snaps in _server_snapshots(log).values():
        for i, (a, b) in enumerate(itertools.pairwise(snaps)):
            if i == len(steps):
                steps.append({"requests": 0, "generated_tokens": 0, "generate_s": 0.0})
            for key in steps[i]:
                steps[i][key] = round(steps[i][key] + b[key] - a[key], 3)
    return steps


def requests_per_replica(log: str) -> list[int]:
    """How many generation requests each hf_dev server (rollout replica) answered in the launch."""
    return [snaps[-1]["requests"] - snaps[0]["requests"] for _, snaps in sorted(_server_snapshots(log).items())]


def code_runs(sandbox_url: str) -> int:
    return int(httpx.get(sandbox_url + "/health", timeout=10).json()["stats"].get("requests", 0))


def progress(message: str) -> None:
    print(f"[mini_grpo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_logged(cmd: list[str], log: Path, env: dict, label: str, total_steps: int, metrics_file: Path) -> tuple[int, float]:
    """Run ``cmd`` with its output going to ``log``, and a console line for each training step that
    reaches verl's metrics file. Returns (exit code, seconds)."""
    from recipe.retool.metrics import MetricsTail

    tail = MetricsTail(metrics_file)
    start = last = time.time()
    progress(f"{label}: starting verl (Ray start-up, then {total_steps} step(s)); full output in {log}")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            for step, metrics in tail.new():
                score = metrics.get("critic/score/mean")
                progress(f"{label}: step {step}/{total_steps} done after {time.time() - last:.1f}s"
                         + (f", score mean {score:+.3f}" if score is not None else ""))
                last = time.time()
        rc = proc.wait()
    progress(f"{label}: finished in {time.time() - start:.0f}s (exit {rc})")
    return rc, time.time() - start


# On the CPU the hf_dev server, the actor and the reference all compute in fp32 (retool_grpo_debug_cpu's
# CPU mixin asks for it; verl's default is bf16), so the rollout-vs-actor agreement measures the
# plumbing (weights synced, log-probs aligned with tokens), not bf16 rounding. The taught model is
# near-certain of most tokens, so with bf16 on one side the Pearson correlation of the probabilities
# is ill-conditioned (0.90 at a max difference of 0.004 on one seed); in fp32 the difference is ~1e-6.
# A learning rate that visibly moves the tiny policy in one step (the template's 1e-6 barely does), so
# that a rollout copy left on stale weights after the sync or the resume cannot pass for on-policy.
VISIBLE_STEP = ["actor_rollout_ref.actor.optim.lr=1e-3"]
# The actor and reference through packed attention (recipe/retool/perf/packed_attention.py): verl's
# remove-padding rows, several sequences per micro-batch. On CPU the kernel is SDPA per sequence;
# on CUDA, PyTorch's varlen flash attention.
def packed_overrides() -> list[str]:
    from recipe.retool.perf.attention import implementation_overrides

    return ["actor_rollout_ref.model.use_remove_padding=true",
            *implementation_overrides("actor_rollout_ref.model", "retool_packed", new_key=False)]


def run_grpo(model: Path, data: Path, ckpt: Path, config: str, total_steps: int, log: Path, env: dict,
             label: str, overrides: list[str], save: bool = True) -> tuple[float, dict[int, dict[str, float]]]:
    """One launch of verl's GRPO; returns its seconds and its steps' metrics (read before a later
    launch sets this one's metrics file aside)."""
    from recipe.retool.metrics import metrics_path
    from recipe.retool.stages import run_dir, train_command

    cmd = train_command("grpo", str(model), data, ckpt, "mini", config,
                        [f"trainer.total_training_steps={total_steps}", f"trainer.save_freq={total_steps if save else -1}",
                         *overrides], python=sys.executable)
    metrics_file = metrics_path(run_dir(ckpt, "grpo", "mini"))
    rc, seconds = run_logged(cmd, log, env, label, total_steps, metrics_file)
    if rc != 0:
        sys.exit(f"GRPO run failed (exit {rc}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return seconds, parse_steps(metrics_file)


PHASES = ["timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/ref", "timing_s/update_actor"]


def phase_means(steps: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean time of each phase over the steps after the first (start-up, compilation and allocator
    warm-up land in step 1), or over step 1 alone when it is the only one."""
    timed = [m for n, m in sorted(steps.items()) if n > 1] or list(steps.values())
    return {k.removeprefix("timing_s/"): round(sum(m[k] for m in timed) / len(timed), 3)
            for k in PHASES if timed and all(k in m for m in timed)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/lab/mini_grpo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="where verl trains and rolls out (default: %(default)s)")
    p.add_argument("--steps", type=int, default=2,
                   help="steps of the first run; a checkpoint is saved after the last (default: %(default)s)")
    p.add_argument("--teach-steps", type=int, default=150,
                   help="Adam steps teaching the model to call the tool (default: %(default)s)")
    p.add_argument("--no-teach", action="store_true", help="keep the random model (it will not call the tool)")
    p.add_argument("--attention", choices=["sdpa", "retool_packed"], default="sdpa",
                   help="the actor's and reference's attention: the debug config's padded SDPA, or packed "
                        "remove-padding rows (default: %(default)s)")
    p.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny",
                   help="tiny: the 2-layer test model; else a random-init Qwen2.5 shape with the full vocabulary "
                        "(needs --device gpu and --no-teach) (default: %(default)s)")
    p.add_argument("--sandbox-url", help="use this running sandbox server (e.g. one started by "
                   "scripts/lab/with_sandbox_cgroup.sh) instead of starting one")
    p.add_argument("--skip-resume", action="store_true", help="only the first run, no checkpoint")
    p.add_argument("--extra", nargs="*", default=[], metavar="OVERRIDE",
                   help="more verl overrides for both runs, e.g. actor_rollout_ref.model.use_fused_kernels=true")
    return p


def main() -> None:
    from recipe.retool import PACKAGE_DIR
    from recipe.retool.data import SAMPLE_SOURCES, prepare_all
    from recipe.retool.dev.tokenizer import build_dev_tokenizer, save_tiny_qwen2
    from recipe.retool.processes import LocalSandbox

    parser = build_parser()
    args = parser.parse_args()
    if args.shape != "tiny" and (args.device != "gpu" or not args.no_teach):
        parser.error(f"--shape {args.shape} needs --device gpu and --no-teach (teaching is for the tiny model)")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"device": args.device, "attention": args.attention, "shape": args.shape}
    progress(f"building a {args.shape} model and the sample data under {out}")
    if args.shape == "tiny":
        model = save_tiny_qwen2(out / "model", build_dev_tokenizer())
    else:  # reused by later runs into the same OUT: same weights for a side-by-side
        model, n_params, _ = build_model(out / f"model-{args.shape}", args.shape)
        summary["parameters"] = n_params
    data = prepare_all(out / "data", SAMPLE_SOURCES)
    if not args.no_teach:
        summary["teach"] = teach_tool_call(model, data["rl"], args.teach_steps, "cuda" if args.device == "gpu" else "cpu")
        progress(f"taught: {summary['teach']}")
    config_name = "retool_grpo_debug" if args.device == "gpu" else "retool_grpo_debug_cpu"
    config = str(PACKAGE_DIR / "dev" / "config" / f"{config_name}.yaml")
    overrides = VISIBLE_STEP + (packed_overrides() if args.attention == "retool_packed" else [])
    overrides += args.extra
    if args.sandbox_url:
        sandbox_url, sandbox = args.sandbox_url.rstrip("/"), None
    else:
        progress("starting the sandbox server")
        sandbox = LocalSandbox(workers=2).wait()
        sandbox_url = sandbox.url
    try:
        env = {**os.environ, "RETOOL_SANDBOX_URL": sandbox_url, "PYTHONUNBUFFERED": "1"}
        runs_before = code_runs(sandbox_url)
        ckpt = out / "ckpt"
        if ckpt.exists():  # an earlier run's checkpoints would be resumed instead of trained
            progress(f"removing the earlier run's checkpoints in {ckpt}")
            shutil.rmtree(ckpt)
        wall1, first = run_grpo(model, out / "data", ckpt, config, args.steps, out / "run1.log", env, "run 1", overrides,
                         save=not args.skip_resume)
        runs_mid = runs_after = code_runs(sandbox_url)
        if not args.skip_resume:
            wall2, second = run_grpo(model, out / "data", ckpt, config, args.steps + 1, out / "run2.log", env,
                             "run 2 (resumes from the checkpoint)", overrides)
            runs_after = code_runs(sandbox_url)
    finally:
        if sandbox is not None:
            sandbox.stop()

    log1 = (out / "run1.log").read_text()
    ckpt_dirs = sorted(p.name for p in (ckpt / "grpo-experiments" / "mini").glob("global_step_*"))
    summary.update({
        "config": config_name, "overrides": overrides,
        "run1": {"wall_s": round(wall1, 1), "steps": first, "rollout_server": rollout_costs(log1),
                 "requests_per_replica": requests_per_replica(log1),
                 "sandbox_code_runs": runs_mid - runs_before},
        "phases": phase_means(first),
        "checkpoints": ckpt_dirs,
    })
    if not args.skip_resume:
        log2 = (out / "run2.log").read_text()
        summary["run2_resumed"] = {"wall_s": round(wall2, 1), "steps": second,
                                   "rollout_server": rollout_costs(log2),
                                   "requests_per_replica": requests_per_replica(log2), "sandbox_code_runs": runs_after - runs_mid}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    expected_first = list(range(1, args.steps + 1))
    if sorted(first) != expected_first:
        sys.exit(f"expected steps {expected_first}; got {sorted(first)}")
    if not args.skip_resume and sorted(summary["run2_resumed"]["steps"]) != [args.steps + 1]:
        sys.exit(f"expected a resumed step {args.steps + 1}; got {sorted(summary['run2_resumed']['steps'])}")


if __name__ == "__main__":
    main()
