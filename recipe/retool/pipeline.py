"""The whole ReTool pipeline on one machine, ending in a report card.

    python -m recipe.retool.pipeline                          # the miniature: trains and evaluates, CPU is enough
    python -m recipe.retool.pipeline --seed 1 --device gpu    # the miniature, another seed, on one GPU (untried)
    python -m recipe.retool.pipeline --full --tokenizer Qwen/Qwen2.5-7B-Instruct   # the real datasets
    python -m recipe.retool.pipeline --full --sample          # the real-scale path on the bundled samples

Without ``--full`` this runs **ReTool in miniature** (:mod:`recipe.retool.dev.miniature`): a
seeded arithmetic task where the interpreter is necessary, a small random-init model, and every
stage for real — data, prefilter, sandbox, verl's SFT trainer, verl's GRPO loop with our tool and
reward (and a text-only ablation), and evaluation through ``evaluate_model.sh`` against a served
checkpoint — ending in a report card that shows whether the recipe learned (default output
``outputs/mini``; about half an hour on two CPU cores, in fp32 whatever the CPU: see docs/miniature.md).

With ``--full``: data → prefilter → sandbox (started locally, smoke-tested) → SFT → GRPO →
evaluation at real scale. SFT and GRPO need GPUs (GRPO also SGLang): without them they are
*skipped*, not faked, and the report shows the exact command a GPU machine would run. Evaluation
needs a model server (``--base-url``/``--model``); without one it is skipped likewise. Everything
lands under ``--out`` (default ``outputs/demo``), and ``report.md`` there summarises each stage.
Reruns resume: finished data files are kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from recipe.retool import PACKAGE_DIR
from recipe.retool.data import DEFAULT_SOURCES, SAMPLE_SOURCES, prepare_all
from recipe.retool.processes import LocalSandbox

logger = logging.getLogger(__name__)

SMOKE_SNIPPETS = [
    ("print(1 + 1)", "2"),
    ("import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))", "[2, 3]"),
    ("import numpy as np\nprint(int(np.arange(101).sum()))", "5050"),
]


@dataclass
class StageResult:
    name: str
    status: str  # done | skipped | failed
    detail: str = ""
    figures: dict[str, object] = field(default_factory=dict)

    def headline(self) -> str:
        """The console line: the detail's first line, complete on its own."""
        lines = self.detail.strip().splitlines()
        first = lines[0].rstrip(" :") if lines else ""
        more = " (more in report.md)" if len(lines) > 1 and "report" not in first else ""
        return f"[{self.name}] {self.status}" + (f": {first}{more}" if first else "")


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def stage_data(out: Path, hub: bool) -> tuple[StageResult, dict[str, Path]]:
    sources = DEFAULT_SOURCES if hub else SAMPLE_SOURCES
    outputs = prepare_all(out / "data_raw", sources)
    import pandas as pd

    figures = {name: len(pd.read_parquet(path)) for name, path in outputs.items()}
    return StageResult("data", "done", f"{'hub datasets' if hub else 'bundled samples'} → {out / 'data_raw'}",
                       figures), outputs


def stage_prefilter(out: Path, raw: dict[str, Path], tokenizer: str, stand_in: bool = False) -> StageResult:
    from recipe.retool.prefilter_dataset import prefilter

    figures = {}
    record = out / "data" / "prefilter.json"  # which tokenizer filtered the cached files
    same_tokenizer = record.exists() and json.loads(record.read_text()).get("tokenizer") == tokenizer
    for name, src in raw.items():
        dst = out / "data" / src.relative_to(out / "data_raw")
        if same_tokenizer and dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
            import pandas as pd

            figures[name] = f"{len(pd.read_parquet(dst))} kept (cached)"
            continue
        res = prefilter(src, dst, tokenizer, progress=False)
        figures[name] = f"{res.kept} kept, {res.dropped} dropped, prompt p50 {int(sorted(res.prompt_lengths)[len(res.prompt_lengths) // 2])} tok"
    record.write_text(json.dumps({"tokenizer": tokenizer, "stand_in": stand_in}))
    which = f"the offline stand-in tokenizer ({tokenizer})" if stand_in else f"tokenizer {tokenizer}"
    return StageResult("prefilter", "done", f"{which} → {out / 'data'}", figures)


def stage_sandbox(sandbox: LocalSandbox) -> StageResult:
    from recipe.retool.sandbox.client import SandboxClient

    async def smoke():
        client = SandboxClient(sandbox.url)
        try:
            return [await client.run_code(code) for code, _ in SMOKE_SNIPPETS]
        finally:
            await client.aclose()

    sandbox.wait()
    results = asyncio.run(smoke())
    bad = [code for (code, want), r in zip(SMOKE_SNIPPETS, results, strict=True) if r.stdout.strip() != want]
    figures = {f"run {i + 1} latency": f"{r.latency_s * 1000:.0f} ms" for i, r in enumerate(results)}
    if bad:
        return StageResult("sandbox", "failed", f"wrong output for: {bad}", figures)
    return StageResult("sandbox", "done", f"local server at {sandbox.url}, {len(results)} smoke runs correct", figures)


SANDBOX_PORT = 8080  # the port the printed GPU commands start a sandbox on


def _launched(verl_command: str) -> str:
    """The head of the verl command train.py launches, up to the module (``torchrun … -m verl.…``)."""
    words = shlex.split(verl_command)
    return shlex.join(words[: words.index("-m") + 2]) + " …" if "-m" in words else verl_command


def stage_train(stage: str, model: str, data_dir: Path, out: Path, gpus: int, sandbox_url: str,
                base_model: str, data_note: str = "") -> StageResult:
    """SFT or GRPO through ``recipe.retool.train``: its config checked with ``--dry-run``, then run
    when the machine can; otherwise skipped, with the exact commands a GPU machine would run.

    GRPO's ``model`` is the SFT output; when SFT has not run (no GPU) the config is checked with
    ``base_model`` in its place, and the printed command still trains from the SFT output."""
    args = [stage, model, str(data_dir), str(out / "checkpoints"), f"demo-{stage}"]
    if gpus:
        args.append(f"trainer.n_gpus_per_node={gpus}")
    check_args = [stage, base_model, *args[2:]] if stage == "grpo" and not Path(model).exists() else args
    dry = subprocess.run([sys.executable, "-m", "recipe.retool.train", *check_args, "--dry-run"],
                         capture_output=True, text=True)
    if dry.returncode != 0:
        return StageResult(stage, "failed", f"config does not pass train.py's check: {dry.stderr.strip()[-500:]}")
    launched = _launched(dry.stdout.split("# command\n")[-1].strip())
    missing = []
    if not gpus:
        missing.append("a CUDA GPU")
    if stage == "grpo":
        import importlib.util

        if importlib.util.find_spec("sglang") is None:
            missing.append("SGLang (pip install -e '.[gpu]')")
    if missing:
        lines = ["python -m recipe.retool.train " + shlex.join(args)]
        if stage == "grpo":  # our code tool calls a sandbox: start one, and tell the trainer where it is
            lines = [f"python -m recipe.retool.sandbox serve --port {SANDBOX_PORT} &",
                     f"RETOOL_SANDBOX_URL=http://127.0.0.1:{SANDBOX_PORT} " + lines[0]]
        origin = (f"GRPO starts from the SFT output ({model}), which the SFT command writes. "
                  if stage == "grpo" else "")
        return StageResult(stage, "skipped", f"needs {' and '.join(missing)}; the commands for a GPU machine are in "
                           f"the report\n\n```\n" + "\n".join(lines) + f"\n```\n\n{origin}train.py checked the "
                           f"config (--dry-run) and launches `{launched}`.{data_note}")
    if stage == "grpo" and not Path(model).exists():
        return StageResult(stage, "skipped", f"needs the SFT output {model}, which the SFT stage did not write")
    env = {**os.environ, "RETOOL_SANDBOX_URL": sandbox_url} if stage == "grpo" else None
    rc = subprocess.call([sys.executable, "-m", "recipe.retool.train", *args], env=env)
    return StageResult(stage, "done" if rc == 0 else "failed", f"exit code {rc}: `{launched}`{data_note}")


def stage_eval(base_url: str | None, model: str | None, data: Path, sandbox_url: str, out: Path,
               samples: int) -> StageResult:
    if not base_url or not model:
        return StageResult("eval", "skipped", "needs a model server: serve a model with vLLM/SGLang and pass "
                           "--base-url http://HOST:PORT/v1 --model NAME (see README)")
    from recipe.retool.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(model=model, output=str(out / "eval" / "aime24.json"), base_url=base_url,
                     sandbox_url=sandbox_url, data=str(data), samples=samples)
    summary = asyncio.run(evaluate(cfg))
    return StageResult("eval", "done", f"{cfg.output}", {**summary["pass_at_k"], "mean tool calls":
                                                         summary["mean_tool_calls"]})


def write_report(out: Path, results: list[StageResult], started: float) -> Path:
    lines = ["# ReTool pipeline report", "", f"Finished in {time.time() - started:.0f}s. Output: `{out}`.", "",
             "| stage | status | figures |", "|---|---|---|"]
    for r in results:
        figures = "; ".join(f"{k}: {v}" for k, v in r.figures.items()) or "—"
        lines.append(f"| {r.name} | {r.status} | {figures} |")
    lines.append("")
    for r in results:
        lines += [f"## {r.name}: {r.status}", "", r.detail or "—", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m recipe.retool.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output directory (default outputs/mini, or outputs/demo with --full)")
    p.add_argument("--full", action="store_true", help="the real-scale pipeline on the hub datasets (GPU machine)")
    mini = p.add_argument_group("miniature (default)")
    mini.add_argument("--seed", type=int, default=0)
    mini.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    mini.add_argument("--quick", action="store_true", help="a shortened miniature: same training, a smaller held-out evaluation (32 x 4; for tests)")
    mini.add_argument("--no-ablation", action="store_true", help="skip the text-only GRPO ablation")
    full = p.add_argument_group("--full")
    full.add_argument("--sample", action="store_true",
                      help="the bundled samples instead of the hub datasets (an offline check of the real-scale path)")
    full.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="base model for SFT (and eval's model name)")
    full.add_argument("--tokenizer", default=None, help="for the prefilter (default: offline dev tokenizer)")
    full.add_argument("--base-url", default=None, help="OpenAI-compatible server to evaluate (optional)")
    full.add_argument("--eval-samples", type=int, default=4)
    args = p.parse_args(argv)

    if not args.full:
        from recipe.retool.dev.miniature import QUICK, Miniature, MiniSettings

        settings = MiniSettings(seed=args.seed, device=args.device, ablation=not args.no_ablation,
                                **(QUICK if args.quick else {}))
        out = Path(args.out or "outputs/mini").resolve()
        out.mkdir(parents=True, exist_ok=True)
        return Miniature(out, settings).run()

    args.out = args.out or "outputs/demo"
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: list[StageResult] = []

    def show(r: StageResult) -> None:
        results.append(r)
        print(r.headline(), flush=True)

    res, raw = stage_data(out, hub=not args.sample)
    show(res)
    tokenizer = args.tokenizer
    data_note = ""
    if tokenizer is None:
        from recipe.retool.dev.tokenizer import save_dev_tokenizer

        tokenizer = str(save_dev_tokenizer(out / "dev_tokenizer"))
        data_note = (f"\n\nNote: {out / 'data'} was length-filtered with the offline stand-in tokenizer, not "
                     f"{args.model}'s: before training on it, rerun with `--tokenizer {args.model}` (or run "
                     f"`python -m recipe.retool.prefilter_dataset` with it).")
    show(stage_prefilter(out, raw, tokenizer, stand_in=args.tokenizer is None))
    sandbox = LocalSandbox()
    try:
        show(stage_sandbox(sandbox))
        gpus = gpu_count()
        show(stage_train("sft", args.model, out / "data", out, gpus, sandbox.url, args.model, data_note))
        sft_out = out / "checkpoints" / "sft-experiments" / "demo-sft"
        show(stage_train("grpo", str(sft_out), out / "data", out, gpus, sandbox.url, args.model, data_note))
        show(stage_eval(args.base_url, args.model if args.base_url else None, out / "data" / "rl" / "aime24.parquet",
                        sandbox.url, out, args.eval_samples))
    finally:
        sandbox.stop()
    report = write_report(out, results, started)
    print(f"\nreport card: {report}\n")
    print(report.read_text())
    print(f"(recipe files: {PACKAGE_DIR}; a rerun resumes; delete {shlex.quote(str(out))} to start over)")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
