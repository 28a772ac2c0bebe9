"""The pipeline's steps as commands, and the one runner that runs stages and writes a report.

Every entry point builds its command lines here — the production pipeline
(:mod:`recipe.retool.pipeline`), the miniature (:mod:`recipe.retool.dev.miniature`), the cloud
plan (:mod:`recipe.retool.cloud.launcher`) and the lab scripts — so a stage's command has one
definition: ``data_command``, ``prefilter_commands``, ``train_command``, ``merge_command``,
``sandbox_command``, ``serve_command``, ``eval_command``. ``python`` is the interpreter the command
names (``python`` inside a container, ``sys.executable`` for a local run).

:class:`Runner` runs named stages in order (timing each, stopping at the first failure, a stage's
exception becoming its failure reason) and :func:`write_report` writes ``report.md`` + ``report.json``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipe.retool import PACKAGE_DIR

PYTHON = "python"
# the data stage's outputs under its directory, and the training config each is measured against
DATA_FILES = {"sft/train.parquet": "sft", "rl/train.parquet": "grpo", "rl/aime24.parquet": "grpo"}
VAL_FILE = "rl/aime24.parquet"
ENGINES = ("sglang", "vllm")


def _py(python: str, module: str, *args: object) -> list[str]:
    return [python, "-m", module, *map(str, args)]


# --- commands ---------------------------------------------------------------------------------
def data_command(out_dir: str | Path, sources: dict[str, str] | None, python: str = PYTHON) -> list[str]:
    """All three data files into ``out_dir``; ``sources`` ``{sft, rl, val}`` (hub ids, directories or
    files), or None for the bundled samples."""
    if sources is None:
        return _py(python, "recipe.retool.data", "all", "--out-dir", out_dir, "--sample")
    return _py(python, "recipe.retool.data", "all", "--out-dir", out_dir, "--sft-source", sources["sft"],
               "--rl-source", sources["rl"], "--aime24-source", sources["val"])


def prefilter_commands(raw_dir: str | Path, data_dir: str | Path, tokenizer: str,
                       configs: dict[str, tuple[str, Sequence[str]]], extra_args: Sequence[str] = (),
                       python: str = PYTHON) -> list[list[str]]:
    """Each data file prefiltered by the budget of the config (and overrides) that trains on it:
    ``configs`` maps ``sft`` / ``grpo`` to ``(config, overrides)``."""
    cmds = []
    for rel, stage in DATA_FILES.items():
        config, overrides = configs[stage]
        cmds.append(_py(python, "recipe.retool.prefilter_dataset", "--input", f"{raw_dir}/{rel}",
                        "--output", f"{data_dir}/{rel}", "--tokenizer", tokenizer, "--config", config,
                        *extra_args, *overrides))
    return cmds


def train_command(stage: str, model: str, data_dir: str | Path, out_dir: str | Path, experiment: str,
                  config: str, overrides: Sequence[str] = (), python: str = PYTHON) -> list[str]:
    """``recipe.retool.train``: SFT or GRPO; checkpoints and metrics under
    ``OUT_DIR/{sft,grpo}-experiments/EXPERIMENT`` (:func:`run_dir`)."""
    return _py(python, "recipe.retool.train", stage, model, data_dir, out_dir, experiment, "--config", config,
               *overrides)


def run_dir(out_dir: str | Path, stage: str, experiment: str) -> str:
    """Where ``train_command`` keeps a run: its ``global_step_N`` checkpoints and ``metrics.jsonl``."""
    return f"{out_dir}/{stage}-experiments/{experiment}"


def merge_command(shard_dir: str | Path, target_dir: str | Path | None = None, python: str = PYTHON) -> list[str]:
    """verl's model merger: FSDP shards → a Hugging Face model (default target ``SHARD_DIR/merged_hf``)."""
    target = target_dir or f"{shard_dir}/merged_hf"
    return _py(python, "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir", shard_dir, "--target_dir", target)


def sandbox_command(port: int, workers: int | None = None, python: str = PYTHON, extra: Sequence[str] = ()) -> list[str]:
    return _py(python, "recipe.retool.sandbox", "serve", "--port", port,
               *(["--workers", workers] if workers else []), *extra)


def serve_command(engine: str, model_path: str, served_name: str, port: int, gpus: int,
                  python: str = PYTHON) -> list[str]:
    """An OpenAI-compatible server for the evaluation, tool calls parsed server-side."""
    if engine == "vllm":
        # `vllm serve` through the interpreter (the console script is absent from --target installs)
        return _py(python, "vllm.entrypoints.cli.main", "serve", model_path, "--served-model-name", served_name,
                   "--port", port, "--tensor-parallel-size", gpus, "--enable-auto-tool-choice",
                   "--tool-call-parser", "hermes")
    if engine == "sglang":
        return _py(python, "sglang.launch_server", "--model-path", model_path, "--served-model-name", served_name,
                   "--port", port, "--tp", gpus, "--tool-call-parser", "qwen25")
    raise ValueError(f"serve engine '{engine}': expected one of {ENGINES}")


def server_ready_url(port: int) -> str:
    """What the evaluation waits for before it starts: the model server's model list."""
    return f"http://127.0.0.1:{port}/v1/models"


def eval_command(served_name: str, output: str | Path, base_url: str, sandbox_url: str, data: str | Path,
                 args: Sequence[str] = (), python: str = PYTHON) -> list[str]:
    return _py(python, "recipe.retool.evaluate", "--model", served_name, "--output", output, "--base-url", base_url,
               "--sandbox-url", sandbox_url, "--data", data, *map(str, args))


def evaluate_script() -> Path:
    """``evaluate_model.sh``: the documented wrapper (positional MODEL OUT BASE_URL SANDBOX_URL API_KEY)."""
    return PACKAGE_DIR / "evaluate_model.sh"


# --- running ----------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    status: str  # done | skipped | failed
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def headline(self) -> str:
        """The console line: status, time and figures, or the first line of the detail."""
        figures = "; ".join(f"{k} {v}" for k, v in self.figures.items())
        first = (self.detail.strip().splitlines() or [""])[0].rstrip(" :")
        shown = figures if self.status == "done" and figures else first
        return f"[{self.name}] {self.status} in {self.seconds:.0f}s" + (f": {shown}" if shown else "")


def say(msg: str) -> None:
    print(msg, flush=True)


class Runner:
    """Runs stages in order; the first failure stops the run (later stages depend on earlier ones)."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.started = time.time()

    @property
    def failed(self) -> bool:
        return any(st.status == "failed" for st in self.stages)

    def run(self, name: str, fn: Callable[[], Stage]) -> Stage | None:
        if self.failed:
            return None
        say(f"[{name}] …")
        t0 = time.time()
        try:
            st = fn()
        except Exception as exc:  # the stage's reason goes into the report; the run stops here
            st = Stage(name, "failed", f"{type(exc).__name__}: {exc}")
        st.seconds = time.time() - t0
        self.stages.append(st)
        say(st.headline())
        if st.status == "failed":
            say(st.detail)
        return st


    def run_all(self, plan: Sequence[tuple[str, Callable[[], Stage]]], cleanup: Callable[[], None] | None = None) -> bool:
        """Each ``(name, stage)`` of ``plan`` in order (until one fails), then ``cleanup`` whatever
        happened (local servers the stages started). True when none failed."""
        try:
            for name, fn in plan:
                self.run(name, fn)
        finally:
            if cleanup:
                cleanup()
        return not self.failed


def run_logged(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
               on_line: Callable[[str], None] | None = None, cwd: str | Path | None = None) -> int:
    """Run ``cmd`` with its output in ``log`` (headed by the command); each line also goes to ``on_line``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh, subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                               text=True, bufsize=1, cwd=cwd) as proc:
        fh.write("$ " + shlex.join(cmd) + "\n")
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            if on_line:
                on_line(line)
        return proc.wait()


def tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def write_report(out: Path, title: str, stages: Sequence[Stage], head: Sequence[str] = (),
                 record: dict[str, Any] | None = None, seconds: float | None = None) -> Path:
    """``OUT/report.md`` (title, ``head`` lines, the stage table, each failure's reason and each
    skipped stage's detail) and ``OUT/report.json`` (``record`` plus the stages)."""
    lines = [f"# {title}", "", *head, "" if head else "", "| stage | status | time (s) | figures |", "|---|---|---|---|"]
    for st in stages:
        figs = "; ".join(f"{k}: {v}" for k, v in st.figures.items()) or "—"
        lines.append(f"| {st.name} | {st.status} | {st.seconds:.0f} | {figs} |")
    for st in stages:
        if st.status != "done" and st.detail:
            fence = ["```", st.detail, "```"] if st.status == "failed" else [st.detail]
            lines += ["", f"## {st.name}: {st.status}", "", *fence]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({**(record or {}), "stages": [asdict(st) for st in stages],
                                                 **({"seconds": seconds} if seconds is not None else {})},
                                                indent=2, default=str))
    return path
