"""ReTool in miniature (the README's main command), shortened: the recipe must *learn*, not only run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.retool.dev.miniature import grpo_curve
from recipe.retool.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def test_the_curve_comes_from_verls_metrics_file_and_rollout_dumps(tmp_path):
    records = [{"step": 1, "data": {"critic/score/mean": -0.5, "num_turns/mean": 3.5, "timing_s/step": 9.1}},
               {"step": 2, "data": {"critic/score/mean": 0.25, "num_turns/mean": 4.0, "reward/verify_timeouts": 1.0}},
               {"step": 2, "data": {"val-core/aime24/acc/mean@4": 0.625}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics = read_metrics(tmp_path)
    assert metrics[1]["critic/score/mean"] == -0.5 and metrics[2]["val-core/aime24/acc/mean@4"] == 0.625
    (tmp_path / "2.jsonl").write_text("".join(json.dumps({"score": s}) + "\n" for s in (1.0, -1.0, -0.9, 1.0)))
    curve = grpo_curve(metrics, tmp_path)
    assert [p["step"] for p in curve] == [1, 2] and "acc" not in curve[0] and curve[1]["acc"] == 0.5
    assert "verify_timeouts" not in curve[0] and curve[1]["verify_timeouts"] == 1


def run_pipeline(args: list[str], log: Path, timeout: float) -> int:
    """The pipeline in its own process group, output to ``log``; on time-out the whole group (Ray,
    torchrun, the sandbox and model servers) is killed, so nothing is left running, and the failure
    shows how far each stage got."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recipe.retool.dev.miniature", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stages = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("[")]
            pytest.fail(f"the miniature ran past {timeout:.0f}s; its stages so far:\n" + "\n".join(stages))


@pytest.mark.slow
@pytest.mark.timeout(3700)
def test_quick_miniature_learns_and_tool_rl_beats_text_rl(tmp_path):
    # about 25 minutes on 2 cores (fp32 everywhere, so the same with or without native bf16); the
    # limit leaves room for a machine twice as slow
    log = tmp_path / "pipeline.log"
    rc = run_pipeline(["--quick", "--seed", "0", "--out", str(tmp_path)], log, timeout=3600)
    assert rc == 0, log.read_text(errors="replace")[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(st["status"] == "done" for st in report["stages"]), report["stages"]
    r = report["results"]
    base, sft, grpo, text = (r[k]["pass@1"] for k in ("base", "sft", "grpo", "grpo_text_only"))
    assert base == 0.0  # the pretrained-to-copy base model solves nothing
    # GRPO learns to call the tool (SFT taught both: half its traces answer "by hand") …
    assert r["grpo"]["tool calls / answer"] >= r["sft"]["tool calls / answer"] + 0.1, r
    # … which lifts held-out accuracy, as verl's own validation measures it before and after RL …
    val = {int(k): v for k, v in json.loads((tmp_path / "grpo_curve.json").read_text())["val_acc"].items()}
    assert val[max(val)] >= val[0] + 0.05, val
    # … and the same RL budget without the tool stays far below
    assert grpo >= text + 10.0, r
    assert (tmp_path / "grpo_curve.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert "| grpo |" in md and "| grpo_text_only |" in md
