"""Prove the real rollout engine on a GPU: serving + evaluation, then verl's GRPO with our template.

    python scripts/lab/gpu_rollout_proof.py --out OUT [--engine sglang|vllm] [--phases eval,grpo,resume,hf_dev]

1. builds a small random-init Qwen2 model (head dim 64, as the engines' attention kernels want)
   with the offline dev tokenizer, and teaches it by teacher forcing to open every answer with a
   ``code_interpreter`` call (``scripts/lab/mini_grpo.py``'s ``teach_tool_call``), so that rollouts
   exercise the tool path; prepares the bundled sample data; starts our sandbox server
   (``python -m recipe.retool.sandbox serve``);
2. ``eval``: serves the model with the engine's OpenAI-compatible server, started with the
   launcher's own serve command (tool-call parser on) and runs ``recipe/retool/evaluate_model.sh``
   against it and our sandbox: pass@k, tool calls (server-parsed vs our hermes fallback);
3. ``grpo``: ``python -m recipe.retool.train grpo … --config recipe/retool/dev/config/retool_grpo_debug.yaml``
   (our GRPO template, overridden in sizes, GPU count and model) with ``actor_rollout_ref.rollout.name=ENGINE``
   for ``--steps`` steps, saving a checkpoint after the last;
4. ``resume``: the same command with one more step: verl resumes from that checkpoint;
5. ``hf_dev``: the same model, batch and steps with the transformers ``hf_dev`` rollout, for a
   side-by-side of the step time and where it goes (gen vs update_actor vs weight sync).

Phases can run in separate invocations (state lives in OUT); each merges its results into
OUT/summary.json. Needs verl 0.9.1 and the engine importable (scripts/lab/gpu_engine_wheels.py stages
them for a machine without internet) and the project first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_grpo import code_runs, parse_steps, teach_tool_call  # noqa: E402

PHASES = ["eval", "grpo", "resume", "hf_dev"]
# sizes of the GRPO runs (the same for the engine and hf_dev): 8 prompts x 4 samples per step. The
# bundled sample keeps 23 RL prompts after the overlong filter, i.e. 2 batches of 8 per epoch: two
# epochs, so that the resumed run has a step 3 to train (with one epoch it resumes and stops at once).
SIZES = ["data.train_batch_size=8", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
         "data.max_response_length=256", "trainer.total_epochs=2"]
SPLIT = ["timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/ref", "timing_s/update_actor",
         "timing_s/update_weights", "timing_s/save_checkpoint"]


def prepare(out: Path, teach_steps: int) -> dict:
    """Model (taught) and data, once per OUT."""
    from recipe.retool.data import SAMPLE_SOURCES, prepare_all
    from recipe.retool.dev.tokenizer import build_dev_tokenizer, save_tiny_qwen2

    model, data = out / "model", out / "data"
    if (out / "prepared.json").exists():
        return json.loads((out / "prepared.json").read_text())
    tok = build_dev_tokenizer()
    save_tiny_qwen2(model, tok, hidden=256, layers=4, heads=4, kv_heads=2)
    files = prepare_all(data, SAMPLE_SOURCES)
    info = {"model": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "vocab": len(tok)},
            "teach": teach_tool_call(model, files["rl"], teach_steps, "cuda")}
    (out / "prepared.json").write_text(json.dumps(info))
    return info


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    """Seconds until the server answers ``url``; exits with the server log's tail if it does not."""
    from recipe.retool.processes import stop_process, wait_until_healthy

    start = time.time()
    try:
        wait_until_healthy(url, timeout, proc, "model server", interval=2)
    except RuntimeError as err:
        if proc.poll() is None:
            stop_process(proc)
        sys.exit(f"{err}; last lines of {log}:\n" + tail(log))
    return time.time() - start


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def tool_call_sources(samples: Path) -> dict[str, int]:
    """Tool calls the server parsed (``tool_calls`` in the message) vs ones our hermes fallback found in text."""
    native = fallback = 0
    for line in samples.read_text().splitlines():
        msgs = json.loads(line).get("transcript") or []
        for i, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            if m.get("tool_calls"):
                native += len(m["tool_calls"])
            elif "<tool_call>" in (m.get("content") or ""):  # the tool messages answering it: one per call run
                j = i + 1
                while j < len(msgs) and msgs[j].get("role") == "tool":
                    fallback, j = fallback + 1, j + 1
    return {"server_parsed": native, "hermes_fallback": fallback}


def phase_eval(out: Path, engine: str, sandbox_url: str, env: dict, samples: int) -> dict:
    from recipe.retool.cloud import launcher
    from recipe.retool.evaluate import samples_path

    exp = launcher.load_experiment(launcher.DEFAULT_CONFIG, [f"eval.server={engine}", "eval.port=8000"], environ={})
    cmd = launcher.serve_command(exp, str(out / "model"), 1)
    cmd = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]  # this interpreter, not PATH's
    # SGLang: the attention backend verl 0.9.1's rollout uses with sglang>=0.5.12 (flashinfer; SGLang's
    # own default on Hopper is fa3, whose 1 GB kernel library the staged copy leaves out)
    cmd += (["--mem-fraction-static", "0.3", "--dtype", "bfloat16", "--attention-backend", "flashinfer"]
            if engine == "sglang"
            else ["--gpu-memory-utilization", "0.3", "--dtype", "bfloat16"])
    log = out / f"serve-{engine}.log"
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        up_s = wait_http(launcher.model_server_url(exp), server, 420, log)
        result = out / f"eval-{engine}" / "aime24.json"
        result.parent.mkdir(exist_ok=True)
        ev = ["bash", str(REPO / "recipe/retool/evaluate_model.sh"), exp.eval.served_name, str(result),
              "http://127.0.0.1:8000/v1", sandbox_url, "EMPTY", "--data", str(out / "data/rl/aime24.parquet"),
              "--samples", str(samples), "--max-turns", "4", "--max-tokens", "512", "--temperature", "1.0"]
        print("$", " ".join(ev), flush=True)
        start = time.time()
        subprocess.run(ev, check=True, env={**env, "PYTHON": sys.executable})
        eval_s = time.time() - start
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    s = json.loads(result.read_text())
    keys = ["num_problems", "num_samples", "pass_at_k", "accuracy", "mean_turns", "mean_tool_calls",
            "mean_response_tokens", "stops", "code_error_rate", "error_rate"]
    return {"serve_command": cmd, "server_up_s": round(up_s, 1), "eval_s": round(eval_s, 1),
            **{k: s.get(k) for k in keys}, "tool_calls": tool_call_sources(samples_path(result))}


def run_grpo(out: Path, engine: str, steps: int, save: int, tag: str, env: dict) -> dict:
    from recipe.retool import PACKAGE_DIR

    ckpt = out / f"ckpt-{engine}"
    config = PACKAGE_DIR / "dev" / "config" / "retool_grpo_debug.yaml"
    from recipe.retool.stages import train_command

    cmd = train_command("grpo", str(out / "model"), out / "data", ckpt, f"proof-{engine}", str(config),
                        [f"actor_rollout_ref.rollout.name={engine}", *SIZES, f"trainer.total_training_steps={steps}",
                         f"trainer.save_freq={save}"], python=sys.executable)
    log = out / f"grpo-{engine}-{tag}.log"
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - start
    if rc != 0:
        sys.exit(f"GRPO ({engine}, {tag}) failed (exit {rc}); last lines of {log}:\n{tail(log, 60)}")
    steps_seen = parse_steps(log.read_text())
    return {"command": cmd, "wall_s": round(wall, 1), "steps": steps_seen,
            "checkpoints": sorted(p.name for p in (ckpt / "grpo-experiments" / f"proof-{engine}").glob("global_step_*"))}


def split(run: dict) -> dict:
    """The last step's time and where it went (the first step includes warm-up)."""
    last = run["steps"][max(run["steps"])] if run["steps"] else {}
    return {k.split("/")[-1]: last.get(k) for k in SPLIT} | {"score_mean": last.get("critic/score/mean"),
                                                               "num_turns_mean": last.get("num_turns/mean")}


def main() -> None:
    from recipe.retool.processes import LocalSandbox

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--engine", choices=["sglang", "vllm"], default="sglang")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {PHASES}")
    p.add_argument("--steps", type=int, default=2, help="steps of the first GRPO run (checkpoint after the last)")
    p.add_argument("--teach-steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=4, help="eval samples per problem")
    p.add_argument("--sandbox-url", help="use the sandbox server running there instead of starting one")
    args = p.parse_args()
    phases = args.phases.split(",")
    if bad := set(phases) - set(PHASES):
        sys.exit(f"unknown phases {bad}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["engine"] = args.engine
    summary["prepared"] = prepare(out, args.teach_steps)
    print("prepared:", summary["prepared"], flush=True)
    # a sandbox server already running (e.g. started in a cgroup of its own), or one of our own
    sandbox = argparse.Namespace(url=args.sandbox_url, stop=lambda: None) if args.sandbox_url else LocalSandbox(workers=4).wait()
    env = {**os.environ, "RETOOL_SANDBOX_URL": sandbox.url, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    failed = []
    try:
        for phase in phases:  # a failed phase is recorded and the next one still runs
            before = code_runs(sandbox.url)
            start = time.time()
            try:
                if phase == "eval":
                    result = phase_eval(out, args.engine, sandbox.url, env, args.samples)
                elif phase == "grpo":
                    result = run_grpo(out, args.engine, args.steps, args.steps, "run1", env)
                elif phase == "resume":
                    result = run_grpo(out, args.engine, args.steps + 1, args.steps, "resumed", env)
                    result["resumed_steps"] = sorted(result["steps"])
                else:
                    result = run_grpo(out, "hf_dev", args.steps, args.steps, "run1", env)
            except (SystemExit, Exception) as exc:  # noqa: BLE001 - the message is the record
                print(f"== {phase} FAILED: {exc}", flush=True)
                result, _ = {"error": str(exc)[-4000:]}, failed.append(phase)
            result["sandbox_code_runs"] = code_runs(sandbox.url) - before
            result["phase_s"] = round(time.time() - start, 1)
            summary[phase] = result
            summary_path.write_text(json.dumps(summary, indent=2))
            print(f"== {phase}: done in {result['phase_s']}s", flush=True)
    finally:
        sandbox.stop()
    if "steps" in summary.get("grpo", {}) and "steps" in summary.get("hf_dev", {}):
        summary["step_split_last_step"] = {args.engine: split(summary["grpo"]), "hf_dev": split(summary["hf_dev"])}
    summary_path.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("grpo", "resume", "hf_dev")}, indent=2))
    if failed:
        sys.exit(f"failed phases: {failed}")
    if "resume" in phases and summary["resume"]["resumed_steps"] != [args.steps + 1]:
        sys.exit(f"expected the resumed run to train step {args.steps + 1} only; got {summary['resume']['resumed_steps']}")


if __name__ == "__main__":
    main()
