"""ReTool in miniature: every stage of the recipe, for real, on a task where the interpreter is necessary.

``python -m recipe.retool.dev.miniature`` (the README's main command). On two CPU cores it takes about half an
hour (it computes in fp32, so a CPU without native bf16 is not slower), and it shows the recipe
*learning*, not only running:

1. **task** — :mod:`recipe.retool.dev.mini_task` writes seeded arithmetic problems in the source
   formats of ReTool-SFT, DAPO-Math and AIME (a held-out test split);
2. **data** / **prefilter** — the recipe's own converters and token-length prefilter;
3. **model** — a random-init Qwen2-architecture model with the offline dev tokenizer (trained on
   the task's text; digits one token each, as in Qwen2.5);
4. **SFT** — verl's SFT trainer with ``dev/config/mini_sft.yaml`` (over ``retool_sft.yaml``);
5. **GRPO** — verl's ``main_ppo`` with ``dev/config/mini_grpo.yaml`` (over
   ``retool_grpo_template.yaml``): the ``hf_dev`` rollout backend, our tool on our sandbox, our
   reward, starting from the SFT checkpoint through ``train.py``'s resolve-and-merge path;
6. **ablation** — the same GRPO budget with the tool disabled (one assistant turn: a tool call
   is never executed), the text-only RL baseline;
7. **eval** — ``evaluate_model.sh`` against a real HTTP server process per checkpoint
   (:mod:`recipe.retool.dev.openai_server`), on the held-out split, with the sampling settings of
   GRPO's validation (one scoring function: :mod:`recipe.retool.reward`).

Everything lands under ``--out``; ``report.md`` is the report card (pass@1, pass@k, tool calls per
answer and turns per model; the GRPO reward/accuracy curve, ``grpo_curve.png``; time per stage;
training-time validation accuracy beside the harness's; ``report.json`` records the settings). A
rerun starts over: nothing of an earlier run in ``--out`` is reused (resuming stages is not built).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recipe.retool import PACKAGE_DIR
from recipe.retool.consistency import consistency_rows, first_drift, run_summary
from recipe.retool.metrics import MetricsTail, metrics_path, read_metrics
from recipe.retool.settings import SANDBOX_URL_ENV
from recipe.retool.stages import (
    VAL_FILE,
    Runner,
    Stage,
    evaluate_script,
    merge_command,
    run_dir,
    run_logged,
    say,
    tail,
    train_command,
    write_report,
)

DEV_CONFIG_DIR = PACKAGE_DIR / "dev" / "config"


@dataclass
class MiniSettings:
    """What identifies a miniature run (recorded in OUT/report.json)."""

    seed: int = 0
    device: str = "cpu"  # cpu | gpu
    sft_traces: int = 4800
    rl_prompts: int = 512
    test_problems: int = 64
    tool_share: float = 0.5
    pretrain_steps: int = 1500
    sft_epochs: int = 1
    grpo_steps: int = 20
    eval_samples: int = 8
    hidden: int = 256
    layers: int = 2
    heads: int = 2
    ablation: bool = True


# A shortened miniature for tests: a smaller held-out evaluation (same training, configs and code path).
QUICK: dict[str, Any] = {"test_problems": 32, "eval_samples": 4}
PROGRESS_KEYS = {"train/loss": "loss", "critic/score/mean": "score", "num_turns/mean": "turns", "timing_s/step": "step_s"}


class ModelServer:
    """A checkpoint served over HTTP by :mod:`recipe.retool.dev.openai_server` in its own process."""

    def __init__(self, model_dir: str, device: str, log: Path, dtype: str = "float32"):
        from recipe.retool.processes import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipe.retool.dev.openai_server", model_dir, "--port", str(self.port),
             "--device", "cuda" if device == "gpu" else "cpu", "--dtype", dtype], stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180.0) -> ModelServer:
        from recipe.retool.processes import wait_until_healthy

        wait_until_healthy(self.url.removesuffix("/v1") + "/health", timeout, self.proc, "model server")
        return self

    def stop(self) -> None:
        from recipe.retool.processes import stop_process

        stop_process(self.proc)
        self._log.close()


class Miniature:
    def __init__(self, out: Path, settings: MiniSettings):
        self.out, self.s = out, settings
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.sandbox = None

    # --- helpers
    def config(self, stage: str) -> str:
        name = f"mini_{stage}{'_gpu' if self.s.device == 'gpu' else ''}.yaml"
        return str(DEV_CONFIG_DIR / name)

    def composed(self, stage: str, overrides: list[str] = ()):
        from recipe.retool.train import compose, split_config_arg

        name, cdir = split_config_arg(self.config(stage))
        return compose(name, list(overrides), cdir)

    def train(self, stage: str, model: str, experiment: str, overrides: list[str], log: Path,
              total: int) -> int:
        cmd = train_command(stage, model, self.out / "data", self.out / "ckpt", experiment, self.config(stage),
                            overrides, python=sys.executable)
        metrics = MetricsTail(metrics_path(run_dir(self.out / "ckpt", stage, experiment)))
        started = time.time()

        def progress(_line: str) -> None:  # about twenty lines a run, from verl's metrics file
            for step, m in metrics.new():
                val = [v for k, v in m.items() if k.startswith("val-core")]
                if step % max(1, total // 20) and step != total and not val:
                    continue
                shown = " ".join(f"{short} {m[k]:.3g}" for k, short in PROGRESS_KEYS.items() if k in m)
                shown += (" val " + " ".join(f"{v:.3g}" for v in val)) if val else ""
                say(f"  [{experiment}] step {step}/{total} {shown} ({time.time() - started:.0f}s)")

        return run_logged(cmd, log, {**self.env, SANDBOX_URL_ENV: self.sandbox.url if self.sandbox else ""},
                          progress)

    # --- stages
    def stage_task(self) -> Stage:
        from recipe.retool.dev.mini_task import write_sources

        s = self.s
        for stale in ("ckpt", "rollouts", "eval"):  # an earlier run's checkpoints would be resumed by verl
            shutil.rmtree(self.out / stale, ignore_errors=True)
        paths = write_sources(self.out / "task", s.seed, s.sft_traces, s.rl_prompts, s.test_problems, s.tool_share)
        self.sources = paths
        return Stage("task", "done", detail=f"seed {s.seed} → {self.out / 'task'}",
                     figures={"sft traces": s.sft_traces, "rl prompts": s.rl_prompts, "test problems": s.test_problems,
                              "tool share in SFT": s.tool_share})

    def stage_data(self) -> Stage:
        from recipe.retool.data import prepare_all

        self.raw = prepare_all(self.out / "data_raw", self.sources, overwrite=True)
        return Stage("data", "done", detail=f"recipe.retool.data → {self.out / 'data_raw'}")

    def stage_model(self) -> Stage:
        from recipe.retool.data import load_code_tool_schema
        from recipe.retool.dev.tokenizer import build_dev_tokenizer, save_tiny_qwen2

        # the task's text and the tool schema the chat template renders into every prompt
        corpus = [line for path in self.sources.values() for line in Path(path).open()]
        tok = build_dev_tokenizer(corpus=[*corpus, json.dumps(load_code_tool_schema())])
        base = self.out / "models" / "base"
        save_tiny_qwen2(base, tok, hidden=self.s.hidden, layers=self.s.layers, heads=self.s.heads,
                        kv_heads=self.s.heads, seed=self.s.seed)
        self.base = base
        from transformers import AutoConfig, AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).parameters())
        return Stage("model", "done", detail=f"random-init Qwen2 → {base}",
                     figures={"parameters": params, "vocab": len(tok), "hidden": self.s.hidden, "layers": self.s.layers})

    def stage_pretrain(self) -> Stage:
        from recipe.retool.dev.pretrain_copy import pretrain_copy

        figures = pretrain_copy(self.base, steps=self.s.pretrain_steps, seed=self.s.seed,
                                device="cuda" if self.s.device == "gpu" else "cpu", log_every=max(1, self.s.pretrain_steps // 10))
        return Stage("pretrain", "done", detail=f"copy objective, in place → {self.base}", figures=figures)

    def stage_prefilter(self) -> Stage:
        from recipe.retool.prefilter_dataset import prefilter

        figures = {}
        for name, src in self.raw.items():
            dst = self.out / "data" / Path(src).relative_to(self.out / "data_raw")
            # each file within the budget of the miniature config that trains on it
            res = prefilter(src, dst, str(self.base), progress=False, config=self.config("sft" if name == "sft" else "grpo"))
            figures[name] = f"{res.kept} kept, {res.dropped} dropped"
        return Stage("prefilter", "done", detail=f"→ {self.out / 'data'}", figures=figures)

    def stage_sandbox(self) -> Stage:
        from recipe.retool.processes import LocalSandbox

        self.sandbox = LocalSandbox(workers=2).wait()
        return Stage("sandbox", "done", detail=f"local server at {self.sandbox.url}")

    def stage_sft(self) -> Stage:
        cfg = self.composed("sft")
        import pandas as pd

        rows = len(pd.read_parquet(self.out / "data" / "sft" / "train.parquet"))
        steps = (rows // int(cfg.data.train_batch_size)) * self.s.sft_epochs
        log = self.out / "logs" / "sft.log"
        rc = self.train("sft", str(self.base), "mini-sft", [f"trainer.total_epochs={self.s.sft_epochs}"], log, steps)
        if rc != 0:
            return Stage("sft", "failed", detail=f"exit {rc}; {log}:\n{tail(log)}")
        metrics = read_metrics(run_dir(self.out / "ckpt", "sft", "mini-sft"))
        last = metrics[max(metrics)] if metrics else {}
        self.sft_ckpt = self.out / "ckpt" / "sft-experiments" / "mini-sft"
        return Stage("sft", "done", detail=f"verl sft_trainer → {self.sft_ckpt}",
                     figures={"steps": max(metrics, default=0), "final loss": round(last.get("train/loss", float("nan")), 3)})

    def stage_grpo(self, name: str, experiment: str, extra: list[str]) -> Stage:
        log = self.out / "logs" / f"{name}.log"
        rollouts = self.out / "rollouts" / name
        overrides = [f"trainer.total_training_steps={self.s.grpo_steps}", f"trainer.save_freq={self.s.grpo_steps}",
                     f"trainer.test_freq={self.s.grpo_steps}", f"trainer.rollout_data_dir={rollouts}",
                     f"data.seed={self.s.seed}", *extra]
        rc = self.train("grpo", str(self.sft_ckpt), experiment, overrides, log, self.s.grpo_steps)
        if rc != 0:
            return Stage(name, "failed", detail=f"exit {rc}; {log}:\n{tail(log)}")
        metrics = read_metrics(run_dir(self.out / "ckpt", "grpo", experiment))
        curve = grpo_curve(metrics, rollouts)
        val = {step: {k: v for k, v in m.items() if k.startswith("val-core/") and "/acc/mean@" in k}
               for step, m in metrics.items()}
        val = {step: next(iter(v.values())) for step, v in val.items() if v}
        checks = {"summary": run_summary(metrics), "first_drift": first_drift(run_dir(self.out / "ckpt", "grpo", experiment))}
        (self.out / f"{name}_curve.json").write_text(json.dumps({"curve": curve, "val_acc": val, "consistency": checks},
                                                                indent=2))
        return Stage(name, "done", detail=f"verl main_ppo → {self.out / 'ckpt' / 'grpo-experiments' / experiment}",
                     figures={"steps": len(curve), "val acc before": val.get(0), "val acc after": val.get(self.s.grpo_steps),
                              "train acc first→last": f"{curve[0]['acc']:.2f}→{curve[-1]['acc']:.2f}" if curve else "—"})

    def stage_eval(self, label: str, model_root: Path | str, extra: list[str]) -> Stage:
        from recipe.retool.train import resolve_model

        resolved = resolve_model(str(model_root))
        if resolved.merge_from is not None and not Path(resolved.path, "config.json").exists():
            subprocess.run(merge_command(resolved.merge_from, resolved.path, python=sys.executable), check=True,
                           capture_output=True, env=self.env)
        grpo_cfg = self.composed("grpo")  # serve as the rollout computes; evaluate as GRPO validates (--config)
        out = self.out / "eval" / label / "test.json"
        if out.exists():  # a rerun evaluates afresh (the model may have changed)
            shutil.rmtree(out.parent)
        server = ModelServer(resolved.path, self.s.device, self.out / "logs" / f"serve_{label}.log",
                             dtype=str(grpo_cfg.actor_rollout_ref.rollout.dtype)).wait()
        try:
            cmd = ["bash", str(evaluate_script()), resolved.path, str(out), server.url, self.sandbox.url,
                   "EMPTY", "--data", str(self.out / "data" / VAL_FILE),
                   "--samples", str(self.s.eval_samples), "--config", self.config("grpo"), *extra]
            rc = run_logged(cmd, self.out / "logs" / f"eval_{label}.log", {**self.env, "PYTHON": sys.executable})
        finally:
            server.stop()
        if rc != 0 or not out.exists():
            return Stage(f"eval {label}", "failed", detail=f"exit {rc}:\n" + tail(self.out / "logs" / f"eval_{label}.log"))
        summary = json.loads(out.read_text())
        figures = {**summary["pass_at_k"], "accuracy": summary["accuracy"], "errors": summary["errors"]["count"],
                   "tool calls / answer": summary["mean_tool_calls"], "turns": summary["mean_turns"]}
        self.results[label] = figures
        return Stage(f"eval {label}", "done", detail=str(out), figures=figures)

    # --- the run
    def run(self) -> int:
        self.results: dict[str, dict[str, Any]] = {}
        started = time.time()
        plan: list[tuple[str, Callable[[], Stage]]] = [
            ("task", self.stage_task), ("data", self.stage_data), ("model", self.stage_model),
            ("pretrain", self.stage_pretrain), ("prefilter", self.stage_prefilter), ("sandbox", self.stage_sandbox), ("sft", self.stage_sft),
            ("grpo", lambda: self.stage_grpo("grpo", "mini-grpo", [])),
        ]
        if self.s.ablation:
            plan.append(("grpo_text_only", lambda: self.stage_grpo(
                "grpo_text_only", "mini-grpo-text", ["actor_rollout_ref.rollout.multi_turn.max_assistant_turns=1"])))
        plan += [
            ("eval base", lambda: self.stage_eval("base", self.base, [])),
            ("eval sft", lambda: self.stage_eval("sft", self.sft_ckpt, [])),
            ("eval grpo", lambda: self.stage_eval("grpo", self.out / "ckpt" / "grpo-experiments" / "mini-grpo", [])),
        ]
        if self.s.ablation:
            plan.append(("eval grpo_text_only", lambda: self.stage_eval(
                "grpo_text_only", self.out / "ckpt" / "grpo-experiments" / "mini-grpo-text", ["--max-turns", "1"])))
        runner = Runner()
        runner.run_all(plan, cleanup=lambda: self.sandbox and self.sandbox.stop())
        report = write_mini_report(self.out, self.s, runner.stages, self.results, time.time() - started)
        say(f"\nreport card: {report}\n")
        say(report.read_text())
        return 1 if runner.failed else 0


def grpo_curve(metrics: dict[int, dict[str, float]], rollouts: Path) -> list[dict[str, float]]:
    """Per training step: mean reward, turns and the reward's symbolic checks that timed out (verl's
    metrics; the count comes from the recipe's verl plugin), and accuracy (share of rollouts scored
    1.0, i.e. correct, from verl's rollout dumps)."""
    curve = []
    for step in sorted(metrics):
        m = metrics[step]
        if "critic/score/mean" not in m:
            continue
        point = {"step": step, "reward": m["critic/score/mean"], "turns": m.get("num_turns/mean", float("nan"))}
        dump = rollouts / f"{step}.jsonl"
        if dump.exists():
            rows = [json.loads(line) for line in dump.open()]
            point["acc"] = sum(r["score"] >= 1.0 for r in rows) / len(rows) if rows else float("nan")
        if "reward/verify_timeouts" in m:  # reward checks past reward_kwargs.verify_timeout (judged wrong)
            point["verify_timeouts"] = int(m["reward/verify_timeouts"])
        curve.append(point)
    return curve


def plot_curves(out: Path, names: list[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for name in names:
        path = out / f"{name}_curve.json"
        if not path.exists():
            continue
        curve = json.loads(path.read_text())["curve"]
        steps = [p["step"] for p in curve]
        a.plot(steps, [p["reward"] for p in curve], marker=".", label=name)
        b.plot(steps, [p.get("acc", float("nan")) for p in curve], marker=".", label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    a.set(xlabel="GRPO step", ylabel="mean reward", title="training reward")
    b.set(xlabel="GRPO step", ylabel="accuracy (share correct)", title="training accuracy", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "grpo_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_mini_report(out: Path, s: MiniSettings, stages: Sequence[Stage], results: dict[str, dict[str, Any]],
                      seconds: float) -> Path:
    """The report card: the models' pass@k and tool use, the GRPO curves and validation, then the stages."""
    head = [f"Seed {s.seed}, device {s.device}, {seconds / 60:.1f} min in all. Held-out test split: "
            f"{s.test_problems} problems × {s.eval_samples} samples, scored by `recipe.retool.reward`.", ""]
    if results:
        ks = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        head += ["| model | " + " | ".join(ks) + " | tool calls / answer | mean turns |",
                 "|---|" + "---|" * (len(ks) + 2)]
        for label, r in results.items():
            head.append(f"| {label} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in ks)
                        + f" | {r['tool calls / answer']:.2f} | {r['turns']:.2f} |")
        head.append("")
    curves = [n for n in ("grpo", "grpo_text_only") if (out / f"{n}_curve.json").exists()]
    png = plot_curves(out, curves)
    if png:
        head += [f"![GRPO reward and accuracy per step]({png.name})", ""]
    for name in curves:
        data = json.loads((out / f"{name}_curve.json").read_text())
        val = data["val_acc"]
        if val:
            head.append(f"- {name}: training-time validation accuracy (verl, same split and sampling) "
                        + ", ".join(f"step {k}: {100 * v:.1f}%" for k, v in sorted(val.items(), key=lambda kv: int(kv[0]))))
        counted = [p["verify_timeouts"] for p in data["curve"] if "verify_timeouts" in p]
        head.append(f"- {name}: reward checks past their time limit (judged wrong): "
                    + (f"{sum(counted)} over {len(counted)} steps" if counted
                       else "not counted (the recipe's verl plugin was not loaded: install the package)"))
        head += consistency_rows(name, data.get("consistency") or {})
    return write_report(out, "ReTool miniature: report card", stages, head,
                        {"settings": asdict(s), "results": results}, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.dev.miniature", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/mini", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="a shortened miniature: same training, a smaller held-out evaluation (32 x 4; for tests)")
    p.add_argument("--no-ablation", action="store_true", help="skip the text-only GRPO ablation")
    args = p.parse_args(argv)
    settings = MiniSettings(seed=args.seed, device=args.device, ablation=not args.no_ablation,
                            **(QUICK if args.quick else {}))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return Miniature(out, settings).run()


if __name__ == "__main__":
    raise SystemExit(main())
