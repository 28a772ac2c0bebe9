"""The production pipeline on one GPU node: every stage in order, from the datasets to AIME24 pass@k.

    python -m recipe.retool.pipeline                                    # Qwen2.5-7B-Instruct on this node's GPUs
    python -m recipe.retool.pipeline --config config/experiments/smoke.yaml
    python -m recipe.retool.pipeline --dry-run gpus=4 grpo.overrides=[trainer.total_training_steps=10]
    scripts/speedrun.sh                                                 # the same, logged, from a fresh checkout

Stages: data → prefilter → sandbox (started here, smoke-tested) → SFT → merge → GRPO → merge →
evaluate (for each of ``eval.models``: the model served by ``eval.server`` — SGLang or vLLM — on
this node, then ``recipe.retool.evaluate`` against it and the sandbox). The settings are the
experiment config the Modal launcher reads (``config/experiments/default.yaml``; ``key=value``
overrides), and the commands are the ones the Modal functions run (:mod:`recipe.retool.stages`
builds both), with this node's directories in place of the volumes.

Without a CUDA GPU, the stages that need one (SFT, GRPO, evaluation) are *skipped*, not faked: the
report shows the exact commands a GPU node runs. A rerun resumes: data files and prefiltered files
are kept, verl resumes training from the latest checkpoint, merged models are reused, and the
evaluation resumes its samples. Everything lands under ``--out`` (default ``outputs/run``) with
``report.md``. For the miniature that shows the recipe *learning* on a CPU, see
``python -m recipe.retool.dev.miniature``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from recipe.retool.consistency import consistency_rows, run_checks
from recipe.retool.experiment import ConfigError, Experiment, Layout, commands, load_experiment
from recipe.retool.metrics import metrics_path
from recipe.retool.processes import LocalSandbox, stop_process, wait_until_healthy
from recipe.retool.settings import DEFAULT_SANDBOX_URL, SANDBOX_PORT, SANDBOX_URL_ENV
from recipe.retool.stages import Runner, Stage, run_logged, sandbox_command, say, server_ready_url, tail, write_report

SMOKE_SNIPPETS = [
    ("print(1 + 1)", "2"),
    ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))", "[2, 3]"),
    ("import numpy as np\nprint(int(np.arange(101).sum()))", "5050"),
]


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


class Pipeline:
    def __init__(self, exp: Experiment, out: Path, gpus: int):
        self.exp, self.out, self.gpus = exp, out, gpus
        self.layout = Layout(data=str(out / "data"), checkpoints=str(out / "checkpoints"), models=None)
        self.cmds = commands(exp, self.layout, python=sys.executable)
        self.sandbox: LocalSandbox | None = None
        self.sandbox_url = exp.sandbox.url or ""
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def logged(self, name: str, cmds: Sequence[Sequence[str]], env: dict[str, str] | None = None) -> Stage:
        """Run ``cmds`` in order, each logged to ``logs/NAME[.i].log``; the first failure fails the stage."""
        for i, cmd in enumerate(cmds):
            log = self.out / "logs" / (f"{name}.log" if len(cmds) == 1 else f"{name}.{i + 1}.log")
            rc = run_logged(cmd, log, {**self.env, **(env or {})}, on_line=lambda line: print(line, end="", flush=True))
            if rc != 0:
                return Stage(name, "failed", f"exit {rc}: {shlex.join(cmd)}\n{tail(log)}")
        return Stage(name, "done", "\n".join(shlex.join(c) for c in cmds))

    def skipped(self, name: str, lines: Sequence[str], need: str) -> Stage:
        return Stage(name, "skipped", f"needs {need}; a GPU node runs:\n\n```\n" + "\n".join(lines) + "\n```")

    # --- stages
    def data(self) -> Stage:
        st = self.logged("data", [self.cmds["data"]])
        if st.status == "done":
            import pandas as pd

            st.figures = {rel: len(pd.read_parquet(Path(self.layout.raw) / rel)) for rel in self.cmds["data_files"]}
        return st

    def prefilter(self) -> Stage:
        import pandas as pd

        todo, figures = [], {}
        record = Path(self.layout.data) / "prefilter.json"  # the commands (tokenizer, budgets) that made the files
        done_before = json.loads(record.read_text()) if record.exists() else {}
        for rel, cmd in zip(self.cmds["data_files"], self.cmds["prefilter"], strict=True):
            src, dst = Path(self.layout.raw) / rel, Path(self.layout.data) / rel
            if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime and done_before.get(rel) == cmd:
                figures[rel] = f"{len(pd.read_parquet(dst))} kept (done earlier)"
            else:
                todo.append(cmd)
        st = self.logged("prefilter", todo) if todo else Stage("prefilter", "done")
        if st.status == "done":
            record.write_text(json.dumps(dict(zip(self.cmds["data_files"], self.cmds["prefilter"], strict=True))))
            figures.update({rel: f"{len(pd.read_parquet(Path(self.layout.data) / rel))} kept"
                            for rel in self.cmds["data_files"] if rel not in figures})
            st.figures = figures
        return st

    def start_sandbox(self) -> Stage:
        if self.exp.sandbox.url:
            return Stage("sandbox", "done", f"the experiment's sandbox at {self.exp.sandbox.url}")
        from recipe.retool.sandbox.client import SandboxClient

        self.sandbox = LocalSandbox(workers=self.exp.sandbox.workers).wait()
        self.sandbox_url = self.sandbox.url

        async def smoke():
            client = SandboxClient(self.sandbox_url)
            try:
                return [await client.run_code(code) for code, _ in SMOKE_SNIPPETS]
            finally:
                await client.aclose()

        results = asyncio.run(smoke())
        bad = [code for (code, want), r in zip(SMOKE_SNIPPETS, results, strict=True) if r.stdout.strip() != want]
        if bad:
            return Stage("sandbox", "failed", f"wrong output for: {bad}")
        return Stage("sandbox", "done", f"local server at {self.sandbox_url}",
                     {"smoke runs": len(results), "slowest": f"{max(r.latency_s for r in results) * 1000:.0f} ms"})

    def train(self, stage: str) -> Stage:
        cmd = self.cmds[stage]
        if not self.gpus:  # what a GPU node runs: GRPO's tool calls a sandbox started beside it
            if stage == "sft":
                return self.skipped(stage, [shlex.join(cmd)], "a CUDA GPU")
            return self.skipped(stage, [shlex.join(sandbox_command(SANDBOX_PORT, python=sys.executable)) + " &",
                                        f"{SANDBOX_URL_ENV}={DEFAULT_SANDBOX_URL} {shlex.join(cmd)}"], "a CUDA GPU")
        return self.logged(stage, [cmd], {SANDBOX_URL_ENV: self.sandbox_url} if stage == "grpo" else None)

    def merge(self, stage: str) -> Stage:
        from recipe.retool.train import CheckpointError, resolve_model

        name = f"merge {stage}"
        root = self.cmds[f"{stage}_root"]
        try:
            resolved = resolve_model(root)
        except CheckpointError as err:
            if not self.gpus:
                return Stage(name, "skipped", f"no {stage} checkpoint on this machine ({err})")
            raise
        if resolved.merge_from is None or Path(resolved.path, "config.json").exists():
            return Stage(name, "done", resolved.path, {"model": resolved.path})
        st = self.logged(name.replace(" ", "_"), [self.cmds["merge"](resolved.merge_from, resolved.path)])
        st.figures = {"model": resolved.path}
        return st

    def evaluate(self, label: str) -> Stage:
        name = f"eval {label}"
        if label not in ("base", "sft", "grpo"):
            return Stage(name, "failed", f"eval.models names '{label}': expected base, sft or grpo")
        model = self.exp.model if label == "base" else self.cmds[f"{label}_root"]
        output = f"{self.layout.eval_dir}/{label}.json"
        if not self.gpus:
            serve = self.cmds["serve"](f"<{label} model>", self.exp.gpus)
            return self.skipped(name, [shlex.join(serve) + " &", shlex.join(self.cmds["eval"](output, DEFAULT_SANDBOX_URL))],
                                "a CUDA GPU")
        from recipe.retool.train import resolve_model

        path = resolve_model(model).path
        log = self.out / "logs" / f"serve_{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as fh:
            server = subprocess.Popen(self.cmds["serve"](path, self.gpus), stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_until_healthy(server_ready_url(self.exp.eval.port), self.exp.eval.server_start_timeout, server,
                               f"model server ({self.exp.eval.server.value}, log {log})", interval=2)
            st = self.logged(f"eval_{label}", [self.cmds["eval"](output, self.sandbox_url)])
        finally:
            stop_process(server, grace=60)
        if st.status == "done":
            summary = json.loads(Path(output).read_text())
            st = Stage(name, "done", output, {**summary["pass_at_k"], "tool calls / answer": summary["mean_tool_calls"]})
        return st

    def run(self) -> int:
        runner = Runner()
        plan = [("data", self.data), ("prefilter", self.prefilter), ("sandbox", self.start_sandbox),
                ("sft", lambda: self.train("sft")), ("merge sft", lambda: self.merge("sft")),
                ("grpo", lambda: self.train("grpo")), ("merge grpo", lambda: self.merge("grpo")),
                *[(f"eval {m}", lambda m=m: self.evaluate(m)) for m in self.exp.eval.models]]
        runner.run_all(plan, cleanup=lambda: self.sandbox and self.sandbox.stop())
        head = [f"Experiment {self.exp.experimenter}/{self.exp.experiment}: {self.exp.model}, "
                f"{self.gpus or 'no'} GPU(s) here; output `{self.out}`."]
        grpo_run = Path(self.cmds["grpo_root"])
        if metrics_path(grpo_run).exists():  # the GRPO run's consistency: rollout vs trainer, drift, tool calls
            head += ["", *consistency_rows("GRPO", run_checks(grpo_run))]
        report = write_report(self.out, "ReTool pipeline report", runner.stages, head,
                              {"experiment": self.exp.experiment, "gpus": self.gpus}, None)
        say(f"\nreport: {report}")
        return 1 if runner.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.retool.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment config (default config/experiments/default.yaml)")
    p.add_argument("--out", default="outputs/run", help="output directory (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print every stage's commands; run nothing")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the experiment config")
    args = p.parse_args(argv)
    try:
        exp = load_experiment(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    gpus = gpu_count()
    if gpus and gpus < exp.gpus:  # train and serve on the GPUs this node has
        print(f"note: the experiment asks for {exp.gpus} GPUs, this node has {gpus}: gpus={gpus}", file=sys.stderr)
        exp = replace(exp, gpus=gpus)
    pipe = Pipeline(exp, out, min(gpus, exp.gpus))
    if args.dry_run:
        c = pipe.cmds
        for name, cmds in (("data", [c["data"]]), ("prefilter", c["prefilter"]), ("sft", [c["sft"]]),
                           ("grpo", [c["grpo"]]),
                           ("eval", [c["serve"]("<model>", exp.gpus), c["eval"](f"{pipe.layout.eval_dir}/<model>.json",
                                                                             exp.sandbox.url or "<local sandbox>")])):
            print(f"[{name}]")
            for cmd in cmds:
                print("  $ " + shlex.join(cmd))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    return pipe.run()


if __name__ == "__main__":
    raise SystemExit(main())
