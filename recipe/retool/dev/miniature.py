"""ReTool in miniature: every stage of the recipe, for real, on a task where the interpreter is necessary.

Run by ``python -m recipe.retool.pipeline`` (no flags). On two CPU cores it takes about half an
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

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipe.retool import PACKAGE_DIR

DEV_CONFIG_DIR = PACKAGE_DIR / "dev" / "config"
STEP_LINE = re.compile(r"\bstep:(\d+) - (.*)$")
_NUMBER = re.compile(r"(?:np\.float\d*\()?(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan)")


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


@dataclass
class Stage:
    name: str
    status: str  # done | failed | skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def _say(msg: str) -> None:
    print(msg, flush=True)


def parse_step_metrics(log_text: str) -> dict[int, dict[str, float]]:
    """verl's console logger lines ``step:N - key:value - …`` → {step: {key: value}}."""
    steps: dict[int, dict[str, float]] = {}
    for line in log_text.splitlines():
        m = STEP_LINE.search(line)
        if not m:
            continue
        metrics = steps.setdefault(int(m.group(1)), {})
        for part in m.group(2).split(" - "):
            key, _, value = part.partition(":")
            num = _NUMBER.match(value.strip())  # 0.5, -1e-3, np.float64(0.5)
            if num:
                metrics[key.strip()] = float(num.group(1))
    return steps


def run_logged(cmd: list[str], log: Path, env: dict[str, str], on_line: Callable[[str], None] | None = None) -> int:
    """Run ``cmd`` with its output in ``log``; each output line also goes to ``on_line`` (progress)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                               text=True, bufsize=1) as proc:
        fh.write("$ " + shlex.join(cmd) + "\n")
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            if on_line:
                on_line(line)
        return proc.wait()


def _tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


class ModelServer:
    """A checkpoint served over HTTP by :mod:`recipe.retool.dev.openai_server` in its own process."""

    def __init__(self, model_dir: str, device: str, log: Path, dtype: str = "float32"):
        from recipe.retool.sandbox.local import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipe.retool.dev.openai_server", model_dir, "--port", str(self.port),
             "--device", "cuda" if device == "gpu" else "cpu", "--dtype", dtype], stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180.0) -> ModelServer:
        from recipe.retool.sandbox.local import wait_until_healthy

        wait_until_healthy(self.url.removesuffix("/v1") + "/health", timeout, self.proc, "model server")
        return self

    def stop(self) -> None:
        from recipe.retool.sandbox.local import stop_process

        stop_process(self.proc)
        self._log.close()


class Miniature:
    def __init__(self, out: Path, settings: MiniSettings):
        self.out, self.s = out, settings
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.stages: list[Stage] = []
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
        cmd = [sys.executable, "-m", "recipe.retool.train", stage, model, str(self.out / "data"),
               str(self.out / "ckpt"), experiment, "--config", self.config(stage), *overrides]
        started = time.time()

        def progress(line: str) -> None:
            m = STEP_LINE.search(line)
            if not m:
                return
            step = int(m.group(1))
            metrics = parse_step_metrics(line)[step]
            if step % max(1, total // 20) and step != total and not any(k.startswith("val-core") for k in metrics):
                return  # about twenty progress lines a run
            keys = {"train/loss": "loss", "critic/score/mean": "score", "num_turns/mean": "turns",
                    "timing_s/step": "step_s"}
            shown = " ".join(f"{short} {metrics[k]:.3g}" for k, short in keys.items() if k in metrics)
            val = {k.split("/")[-2] if "/" in k else k: v for k, v in metrics.items() if k.startswith("val-core")}
            if val:
                shown += " val " + " ".join(f"{v:.3g}" for v in val.values())
            _say(f"  [{experiment}] step {step}/{total} {shown} ({time.time() - started:.0f}s)")

        return run_logged(cmd, log, {**self.env, "RETOOL_SANDBOX_URL": self.sandbox.url if self.sandbox else ""},
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
        from recipe.retool.sandbox.local import LocalSandbox

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
            return Stage("sft", "failed", detail=f"exit {rc}; {log}:\n{_tail(log)}")
        metrics = parse_step_metrics(log.read_text())
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
            return Stage(name, "failed", detail=f"exit {rc}; {log}:\n{_tail(log)}")
        metrics = parse_step_metrics(log.read_text())
        curve = grpo_curve(metrics, rollouts)
        val = {step: {k: v for k, v in m.items() if k.startswith("val-core/") and "/acc/mean@" in k}
               for step, m in metrics.items()}
        val = {step: next(iter(v.values())) for step, v in val.items() if v}
        (self.out / f"{name}_curve.json").write_text(json.dumps({"curve": curve, "val_acc": val}, indent=2))
        return Stage(name, "done", detail=f"verl main_ppo → {self.out / 'ckpt' / 'grpo-experiments' / experiment}",
                     figures={"steps": len(curve), "val acc before": val.get(0), "val acc after": val.get(self.s.grpo_steps),
                              "train acc first→last": f"{curve[0]['acc']:.2f}→{curve[-1]['acc']:.2f}" if curve else "—"})

    def stage_eval(self, label: str, model_root: Path | str, extra: list[str]) -> Stage:
        from recipe.retool.train import resolve_model

        resolved = resolve_model(str(model_root))
        if resolved.merge_from is not None and not Path(resolved.path, "config.json").exists():
            subprocess.run(resolved.merge_command(), check=True, capture_output=True, env=self.env)
        grpo_cfg = self.composed("grpo")  # evaluate as GRPO validates: its sampling, budget and turns
        val = grpo_cfg.actor_rollout_ref.rollout.val_kwargs
        out = self.out / "eval" / label / "test.json"
        if out.exists():  # a rerun evaluates afresh (the model may have changed)
            shutil.rmtree(out.parent)
        server = ModelServer(resolved.path, self.s.device, self.out / "logs" / f"serve_{label}.log",
                             dtype=str(grpo_cfg.actor_rollout_ref.rollout.dtype)).wait()
        try:
            cmd = ["bash", str(PACKAGE_DIR / "evaluate_model.sh"), resolved.path, str(out), server.url, self.sandbox.url,
                   "EMPTY", "--data", str(self.out / "data" / "rl" / "aime24.parquet"),
                   "--samples", str(self.s.eval_samples), "--temperature", str(val.temperature),
                   "--top-p", str(val.top_p), "--max-tokens", str(grpo_cfg.data.max_response_length),
                   "--max-turns", str(grpo_cfg.actor_rollout_ref.rollout.multi_turn.max_assistant_turns), *extra]
            rc = run_logged(cmd, self.out / "logs" / f"eval_{label}.log", {**self.env, "PYTHON": sys.executable})
        finally:
            server.stop()
        if rc != 0 or not out.exists():
            return Stage(f"eval {label}", "failed", detail=f"exit {rc}:\n" + _tail(self.out / "logs" / f"eval_{label}.log"))
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
        failed = False
        try:
            for name, fn in plan:
                _say(f"[{name}] …")
                t0 = time.time()
                try:
                    st = fn()
                except Exception as exc:  # a stage's failure ends the run with its reason in the report
                    st = Stage(name, "failed", detail=f"{type(exc).__name__}: {exc}")
                st.seconds = time.time() - t0
                self.stages.append(st)
                figs = "; ".join(f"{k} {v}" for k, v in st.figures.items())
                _say(f"[{name}] {st.status} in {st.seconds:.0f}s" + (f": {figs}" if figs else ""))
                if st.status == "failed":
                    _say(st.detail)
                    failed = True
                    break
        finally:
            if self.sandbox:
                self.sandbox.stop()
        report = write_report(self.out, self.s, self.stages, self.results, time.time() - started)
        _say(f"\nreport card: {report}\n")
        _say(report.read_text())
        return 1 if failed else 0


def grpo_curve(metrics: dict[int, dict[str, float]], rollouts: Path) -> list[dict[str, float]]:
    """Per training step: mean reward, accuracy (share of rollouts scored 1.0, i.e. correct), turns and
    the reward's symbolic checks that timed out (from verl's rollout dumps)."""
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
            # reward checks that ran past reward_kwargs.verify_timeout (judged wrong)
            point["verify_timeouts"] = int(sum(r.get("verify_timed_out", 0) for r in rows))
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


def write_report(out: Path, s: MiniSettings, stages: list[Stage], results: dict[str, dict[str, Any]],
                 seconds: float) -> Path:
    lines = ["# ReTool miniature: report card", "",
             f"Seed {s.seed}, device {s.device}, {seconds / 60:.1f} min in all. Held-out test split: "
             f"{s.test_problems} problems × {s.eval_samples} samples, scored by `recipe.retool.reward`.", ""]
    if results:
        ks = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        lines += ["| model | " + " | ".join(ks) + " | tool calls / answer | mean turns |",
                  "|---|" + "---|" * (len(ks) + 2)]
        for label, r in results.items():
            lines.append(f"| {label} | " + " | ".join(f"{r.get(k, float('nan')):.1f}" for k in ks)
                         + f" | {r['tool calls / answer']:.2f} | {r['turns']:.2f} |")
        lines.append("")
    curves = [n for n in ("grpo", "grpo_text_only") if (out / f"{n}_curve.json").exists()]
    png = plot_curves(out, curves)
    if png:
        lines += [f"![GRPO reward and accuracy per step]({png.name})", ""]
    for name in curves:
        data = json.loads((out / f"{name}_curve.json").read_text())
        val = data["val_acc"]
        if val:
            lines.append(f"- {name}: training-time validation accuracy (verl, same split and sampling) "
                         + ", ".join(f"step {k}: {100 * v:.1f}%" for k, v in sorted(val.items(), key=lambda kv: int(kv[0]))))
        late = sum(p.get("verify_timeouts", 0) for p in data["curve"])
        lines.append(f"- {name}: reward checks past their time limit (judged wrong): {late} over {len(data['curve'])} steps")
    lines += ["", "| stage | status | time (s) | figures |", "|---|---|---|---|"]
    for st in stages:
        figs = "; ".join(f"{k}: {v}" for k, v in st.figures.items()) or "—"
        lines.append(f"| {st.name} | {st.status} | {st.seconds:.0f} | {figs} |")
    failed = [st for st in stages if st.status == "failed"]
    for st in failed:
        lines += ["", f"## {st.name} failed", "", "```", st.detail, "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"settings": asdict(s), "results": results,
                                                 "stages": [asdict(st) for st in stages], "seconds": seconds},
                                                indent=2, default=str))
    return path
