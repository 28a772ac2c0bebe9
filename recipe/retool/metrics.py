"""verl's training metrics, read from its ``file`` logger (JSON lines), never from console text.

Our configs list ``file`` in ``trainer.logger``; ``recipe.retool.train`` points verl's file logger
(``VERL_FILE_LOGGER_PATH``) at ``metrics.jsonl`` in the run's checkpoint directory, so every SFT and
GRPO run leaves its per-step metrics beside its checkpoints. verl opens that file afresh at each
launch, so ``train`` first moves an earlier launch's file aside (``metrics.1.jsonl``, …): a resumed
run keeps the history of the launches before it, and :func:`read_metrics` reads them all in order.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    """Where a run's metrics go: ``RUN_DIR/metrics.jsonl`` (RUN_DIR: ``trainer.default_local_dir``)."""
    return Path(run_dir) / METRICS_FILE


def set_aside(path: Path) -> Path | None:
    """Before a launch: move an earlier launch's metrics to the next free ``metrics.N.jsonl``."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target


def _launches(path: Path) -> list[Path]:
    earlier = sorted(path.parent.glob(f"{path.stem}.*{path.suffix}"),
                     key=lambda p: int(p.name[len(path.stem) + 1:-len(path.suffix)]) if
                     p.name[len(path.stem) + 1:-len(path.suffix)].isdigit() else -1)
    return [*earlier, path]


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() == "nan":
        return math.nan
    return None


def parse_records(lines: list[str], source: str = "") -> dict[int, dict[str, float]]:
    """verl's file logger records ``{"step": N, "data": {key: value}}`` → {step: {key: value}}.

    Several records of one step (training metrics, then validation) merge; non-numeric values are
    skipped. A line that is not such a record is an error naming the file and line (a torn last line
    of a run still writing is skipped)."""
    steps: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not line.endswith("\n"):
                break  # the writer is mid-line
            raise ValueError(f"{source}:{i}: not a JSON line of verl's file logger: {line[:120]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or not isinstance(record.get("data"), dict):
            raise ValueError(f"{source}:{i}: expected {{\"step\": int, \"data\": {{…}}}}, got {line[:120]!r}")
        row = steps.setdefault(record["step"], {})
        for key, value in record["data"].items():
            num = _number(value)
            if num is not None:
                row[key] = num
    return steps


def read_metrics(path: str | Path) -> dict[int, dict[str, float]]:
    """Every step's metrics of a run (all its launches; a later launch's value of a step wins).
    ``path``: the run directory or its ``metrics.jsonl``."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".jsonl":
        path = metrics_path(path)
    steps: dict[int, dict[str, float]] = {}
    for launch in _launches(path):
        if launch.exists():
            with launch.open() as fh:
                for step, row in parse_records(fh.readlines(), str(launch)).items():
                    steps.setdefault(step, {}).update(row)
    return dict(sorted(steps.items()))


class MetricsTail:
    """Follows a run's ``metrics.jsonl`` while it is written: :meth:`new` returns the complete
    records that arrived since the last call (for progress lines).

    A file already there when the tail starts belongs to an earlier launch, which the new launch
    sets aside (:func:`set_aside`) once it starts: its records are not news, and the file may be
    renamed between two looks at it. The tail follows the file by identity (device and inode),
    so it starts again at the top of each new file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._stale = self._identity()
        self._current = None

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def new(self) -> list[tuple[int, dict[str, float]]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:  # not written yet, or being set aside right now
            return []
        with fh:
            st = os.fstat(fh.fileno())
            identity = (st.st_dev, st.st_ino)
            if identity == self._stale:
                return []
            if identity != self._current:
                self._current, self._offset = identity, 0
            fh.seek(self._offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        out = []
        for line in complete.decode().splitlines():
            out += list(parse_records([line + "\n"], str(self.path)).items())
        return out
