"""Helpers for tests that launch verl's trainers for real (a module beside the tests, not a package)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from recipe.retool import PACKAGE_DIR

MINI_SFT = PACKAGE_DIR / "dev" / "config" / "mini_sft.yaml"


def sft_command(model, data_dir, out: Path, name: str, steps: int, extra: Sequence[str] = (),
                config: Path = MINI_SFT) -> list[str]:
    from recipe.retool.stages import train_command

    return train_command("sft", str(model), data_dir, out, name, str(config),
                         [f"trainer.total_training_steps={steps}", *extra], python=sys.executable)


def sft_losses(run_dir: str | Path) -> dict[int, float]:
    """Per-step losses of a run (all its launches), from verl's metrics file."""
    from recipe.retool.metrics import read_metrics

    return {step: m["train/loss"] for step, m in read_metrics(run_dir).items() if "train/loss" in m}


def run_sft(model, data_dir, out: Path, name: str, steps: int, extra: Sequence[str] = (),
            config: Path = MINI_SFT, log: str | None = None) -> dict[int, float]:
    """One launch of verl's SFT trainer; its output in ``OUT/LOG.log``; the run's per-step losses."""
    from recipe.retool.stages import run_dir

    proc = subprocess.run(sft_command(model, data_dir, out, name, steps, extra, config),
                          capture_output=True, text=True, timeout=900)
    (out / f"{log or name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return sft_losses(run_dir(out, "sft", name))
