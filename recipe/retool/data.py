"""Data preparation: source datasets → parquet files in the schemas verl 0.9.1 loads.

Three conversions, each loading through Hugging Face ``datasets`` (a hub id, a local dataset
directory, or a local ``.parquet`` / ``.jsonl`` / ``.json`` file):

- ``sft``: ReTool-SFT (``JoeYing/ReTool-SFT``) → multi-turn SFT parquet for verl's
  ``MultiTurnSFTDataset``: a ``messages`` column whose assistant turns carry OpenAI-style
  ``tool_calls`` to ``code_interpreter`` and whose ``tool`` turns carry the interpreter output,
  plus a ``tools`` column with the tool's function schema (so the chat template renders the tool
  instructions, exactly as the rollout does in RL).
- ``rl``: DAPO-Math-17k (``BytedTsinghua-SIA/DAPO-Math-17k``) → RL prompts parquet for verl's
  ``RLHFDataset`` (``prompt``, ``data_source``, ``reward_model.ground_truth``, ``agent_name``,
  ``extra_info`` with ``tools_kwargs``), deduplicated by problem text.
- ``val``: AIME-style problem/answer tables (``Maxwell-Jia/AIME_2024``, AIME 2025, …) → the same
  RL schema.

Rows that cannot be converted are never dropped silently: each one is written, with the reason
(file, row, field, what was expected), to ``<out>.rejected.jsonl`` and counted in the summary.
A missing column or an unreadable source is a fatal error that names it.

``all`` runs the three on the default sources (or the bundled samples with ``--sample``),
skipping outputs that already exist unless ``--overwrite``: an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe.retool import CONFIG_DIR, SAMPLE_DATA_DIR
from recipe.retool.code_blocks import extract_code

logger = logging.getLogger(__name__)

TOOL_CONFIG_PATH = CONFIG_DIR / "tool_config" / "retool.yaml"
AGENT_NAME = "tool_agent"

DEFAULT_SOURCES = {
    "sft": "JoeYing/ReTool-SFT",
    "rl": "BytedTsinghua-SIA/DAPO-Math-17k",
    "aime24": "Maxwell-Jia/AIME_2024",
}
SAMPLE_SOURCES = {
    "sft": str(SAMPLE_DATA_DIR / "retool_sft_sample.jsonl"),
    "rl": str(SAMPLE_DATA_DIR / "dapo_math_sample.jsonl"),
    "aime24": str(SAMPLE_DATA_DIR / "aime_sample.jsonl"),
}

# RL prompts carry the task instruction; the *tool* instructions come from the chat template,
# which renders the code_interpreter schema from the tool config at rollout time (verl passes
# the tool schemas to apply_chat_template). The SFT data renders the same schema via its
# ``tools`` column, so the model sees one format in SFT, RL and evaluation.
INSTRUCTION = (
    "Solve the following math problem. You may write Python code and run it with the "
    "code_interpreter tool to compute or check intermediate results. "
    "Put your final answer within \\boxed{}."
)

# DAPO-Math-17k wraps every problem in an "Answer:"-style instruction; we take the problem out.
_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.\s*$")

_CODE_RE = re.compile(r"<code>(.*?)</code>", re.DOTALL)
_INTERP_RE = re.compile(r"\s*<interpreter>(.*?)</interpreter>", re.DOTALL)


class DataError(ValueError):
    """Bad input that stops the conversion (unreadable source, missing column)."""


class RowError(ValueError):
    """Bad input in one row: the row is rejected, recorded and counted."""

    def __init__(self, field_name: str, expected: str):
        super().__init__(f"field '{field_name}': expected {expected}")
        self.field_name = field_name


@dataclass
class Report:
    """What a conversion did: counts, and every rejected row with its reason."""

    source: str
    total: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, row_index: int, error: RowError, row: dict[str, Any]) -> None:
        reason = f"{self.source}, row {row_index}: {error}"
        logger.warning("rejected %s", reason)
        self.rejected.append({"row": row_index, "field": error.field_name, "reason": reason, "data": row})

    def summary(self) -> str:
        return (
            f"{self.source}: {self.total} rows read, {self.written} written, "
            f"{self.duplicates} duplicates merged, {len(self.rejected)} rejected"
        )


# ----------------------------------------------------------------------------------------------
# loading and writing
# ----------------------------------------------------------------------------------------------


def load_code_tool_schema(tool_config_path: str | Path = TOOL_CONFIG_PATH) -> dict[str, Any]:
    """The code_interpreter's OpenAI function schema, read from the tool config (one source)."""
    import yaml

    with open(tool_config_path) as fh:
        cfg = yaml.safe_load(fh)
    try:
        return cfg["tools"][0]["tool_schema"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{tool_config_path}: expected tools[0].tool_schema") from exc


def code_tool_name(tool_config_path: str | Path = TOOL_CONFIG_PATH) -> str:
    return load_code_tool_schema(tool_config_path)["function"]["name"]


def load_source(source: str, split: str = "train"):
    """Load a dataset split with ``datasets``: local file, local directory, or hub id."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(suffix)
            if builder is None:
                raise DataError(f"{source}: unsupported file type '{suffix}' (expected .parquet, .jsonl, .json, .csv)")
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        return datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; name the source either way
        raise DataError(f"{source}: cannot load split '{split}': {type(exc).__name__}: {exc}") from exc


def require_columns(ds, source: str, *alternatives: tuple[str, ...]) -> list[str]:
    """For each group of acceptable names, return the column present; fail naming what is missing."""
    found = []
    for names in alternatives:
        match = next((n for n in names if n in ds.column_names), None)
        if match is None:
            raise DataError(
                f"{source}: missing column {' or '.join(repr(n) for n in names)}; "
                f"columns present: {ds.column_names}"
            )
        found.append(match)
    return found


def write_parquet(rows: list[dict[str, Any]], out: str | Path) -> None:
    """Write atomically (tmp file + rename) so an interrupted run never leaves a partial file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out)


def write_rejects(report: Report, out: str | Path) -> Path | None:
    path = Path(str(out) + ".rejected.jsonl")
    if not report.rejected:
        path.unlink(missing_ok=True)
        return None
    with path.open("w") as fh:
        for item in report.rejected:
            fh.write(json.dumps(item, default=str) + "\n")
    return path


def _convert(
    ds, source: str, convert_row: Callable[[int, dict[str, Any]], dict[str, Any] | None], desc: str
) -> tuple[list[dict[str, Any]], Report]:
    from tqdm import tqdm

    report = Report(source=source)
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(tqdm(ds, desc=desc, unit="row", disable=None)):
        report.total += 1
        try:
            converted = convert_row(i, row)
        except RowError as err:
            report.reject(i, err, row)
            continue
        if converted is None:
            report.duplicates += 1
            continue
        rows.append(converted)
    report.written = len(rows)
    return rows, report


def _text(row: dict[str, Any], key: str, what: str = "a non-empty string") -> str:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RowError(key, f"{what}, got {type(value).__name__} {value!r:.60}")
    return value.strip()


# ----------------------------------------------------------------------------------------------
# ReTool-SFT → multi-turn SFT
# ----------------------------------------------------------------------------------------------


def split_assistant_turn(content: str, tool_name: str) -> list[dict[str, Any]]:
    """Turn one ReTool assistant message into assistant/tool turns.

    ``text <code>```python c```</code> <interpreter>out</interpreter> more text <answer>…</answer>``
    becomes assistant(text, tool_calls=[c]) → tool(out) → assistant(more text <answer>…</answer>).
    """
    turns: list[dict[str, Any]] = []
    pos = 0
    while True:
        m = _CODE_RE.search(content, pos)
        if m is None:
            break
        code = extract_code(m.group(1)).strip()
        if not code:
            raise RowError("messages", f"a non-empty <code> block at character {m.start()}")
        interp = _INTERP_RE.match(content, m.end())
        if interp is None:
            raise RowError("messages", f"an <interpreter> block right after the <code> block at character {m.start()}")
        turns.append(
            {
                "role": "assistant",
                "content": content[pos : m.start()].strip(),
                "tool_calls": [{"type": "function", "function": {"name": tool_name, "arguments": {"code": code}}}],
            }
        )
        turns.append({"role": "tool", "content": interp.group(1).strip()})
        pos = interp.end()
    if "<code>" in content[pos:]:
        raise RowError("messages", "every <code> to be closed by </code>")
    tail = content[pos:].strip()
    if not tail:
        raise RowError("messages", "a final assistant answer after the last interpreter output")
    turns.append({"role": "assistant", "content": tail})
    return turns


def convert_sft_row(
    row: dict[str, Any], index: int, source: str, tool_name: str, tools: list[dict[str, Any]]
) -> dict[str, Any]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("messages", f"a non-empty list of {{role, content}} dicts, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise RowError(f"messages[{j}].role", "one of system/user/assistant")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"messages[{j}].content", "a non-empty string")
        if msg["role"] == "assistant":
            try:
                out.extend(split_assistant_turn(content, tool_name))
            except RowError as err:
                raise RowError(f"messages[{j}].content", str(err).split("expected ", 1)[-1]) from err
        else:
            out.append({"role": msg["role"], "content": content.strip()})
    if not any(m["role"] == "user" for m in out) or out[-1]["role"] != "assistant":
        raise RowError("messages", "a user turn and a final assistant turn")
    # Every assistant turn gets a tool_calls list (empty when none) so parquet sees one struct type.
    for m in out:
        if m["role"] == "assistant":
            m.setdefault("tool_calls", [])
    return {
        "messages": out,
        "tools": tools,
        "data_source": "retool_sft",
        "extra_info": {"index": index, "source": source, "num_tool_calls": sum(len(m.get("tool_calls") or []) for m in out)},
    }


def prepare_sft(source: str, out: str | Path, split: str = "train") -> Report:
    ds = load_source(source, split)
    require_columns(ds, source, ("messages",))
    schema = load_code_tool_schema()
    tool_name = schema["function"]["name"]
    rows, report = _convert(
        ds, source, lambda i, r: convert_sft_row(r, i, source, tool_name, [schema]), desc="sft"
    )
    _finish(rows, report, out)
    return report


# ----------------------------------------------------------------------------------------------
# RL prompts (DAPO-Math-17k) and validation sets (AIME)
# ----------------------------------------------------------------------------------------------


def strip_dapo_wrapper(content: str) -> str:
    """Remove DAPO-Math's "Answer:" instruction around the problem (we ask for \\boxed{} instead)."""
    return _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", content, count=1)).strip()


def rl_row(problem: str, answer: str, data_source: str, index: int, split: str, tool_name: str) -> dict[str, Any]:
    """One row in the schema verl's RLHFDataset + tool_agent loop read."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": f"{INSTRUCTION}\n\n{problem}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "agent_name": AGENT_NAME,
        # verl 0.9.1's RLHFDataset reads tools_kwargs / index from inside extra_info.
        "extra_info": {
            "index": index,
            "split": split,
            "problem": problem,
            "answer": answer,
            "tools_kwargs": {tool_name: {"create_kwargs": {"ground_truth": answer}}},
        },
    }


def _normalize_problem(problem: str) -> str:
    return " ".join(problem.split())


def prepare_rl(source: str, out: str | Path, split: str = "train", data_source: str = "dapo_math") -> Report:
    ds = load_source(source, split)
    require_columns(ds, source, ("prompt",), ("reward_model",))
    tool_name = code_tool_name()
    seen: dict[str, str] = {}
    conflicts = 0

    def convert(i: int, row: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal conflicts
        prompt = row.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            content = prompt[-1].get("content")
        elif isinstance(prompt, str):
            content = prompt
        else:
            raise RowError("prompt", "a list of chat messages or a string")
        if not isinstance(content, str) or not content.strip():
            raise RowError("prompt[-1].content", "a non-empty string")
        reward = row.get("reward_model")
        if not isinstance(reward, dict):
            raise RowError("reward_model", "a dict with 'ground_truth'")
        answer = _text(reward, "ground_truth")
        problem = strip_dapo_wrapper(content)
        key = _normalize_problem(problem)
        if key in seen:
            if seen[key] != answer:
                conflicts += 1
                logger.warning("%s, row %d: duplicate problem with a different answer (%r vs %r); kept the first",
                               source, i, answer, seen[key])
            return None
        seen[key] = answer
        return rl_row(problem, answer, data_source, len(seen) - 1, split, tool_name)

    rows, report = _convert(ds, source, convert, desc="rl")
    if conflicts:
        logger.warning("%s: %d duplicates disagreed on the answer", source, conflicts)
    _finish(rows, report, out)
    return report


def prepare_val(source: str, out: str | Path, data_source: str = "aime24", split: str = "train") -> Report:
    """AIME-style tables: a problem column and an answer column (names matched case-insensitively)."""
    ds = load_source(source, split)
    lower = {c.lower(): c for c in ds.column_names}
    problem_col = next((lower[c] for c in ("problem", "question") if c in lower), None)
    answer_col = next((lower[c] for c in ("answer", "final_answer") if c in lower), None)
    if problem_col is None or answer_col is None:
        raise DataError(f"{source}: expected a 'problem'/'question' column and an 'answer' column; "
                        f"columns present: {ds.column_names}")
    tool_name = code_tool_name()

    def convert(i: int, row: dict[str, Any]) -> dict[str, Any]:
        return rl_row(_text(row, problem_col), _text(row, answer_col), data_source, i, "test", tool_name)

    rows, report = _convert(ds, source, convert, desc=data_source)
    _finish(rows, report, out)
    return report


def _finish(rows: list[dict[str, Any]], report: Report, out: str | Path) -> None:
    if not rows:
        raise DataError(f"{report.source}: no usable rows ({len(report.rejected)} rejected); see "
                        f"{write_rejects(report, out)}")
    write_parquet(rows, out)
    rejects = write_rejects(report, out)
    logger.info("%s → %s", report.summary(), out)
    if rejects:
        logger.warning("%d rejected rows with reasons in %s", len(report.rejected), rejects)


def prepare_all(out_dir: str | Path, sources: dict[str, str], overwrite: bool = False) -> dict[str, Path]:
    """Prepare sft/train.parquet, rl/train.parquet and rl/aime24.parquet under ``out_dir``."""
    out_dir = Path(out_dir)
    outputs = {
        "sft": out_dir / "sft" / "train.parquet",
        "rl": out_dir / "rl" / "train.parquet",
        "aime24": out_dir / "rl" / "aime24.parquet",
    }
    jobs: dict[str, Callable[[], Report]] = {
        "sft": lambda: prepare_sft(sources["sft"], outputs["sft"]),
        "rl": lambda: prepare_rl(sources["rl"], outputs["rl"]),
        "aime24": lambda: prepare_val(sources["aime24"], outputs["aime24"], data_source="aime24"),
    }
    for name, job in jobs.items():
        if outputs[name].exists() and not overwrite:
            logger.info("%s exists, skipping (use --overwrite to redo)", outputs[name])
            continue
        print(job().summary())
    return outputs


def _parse(argv: Iterable[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m recipe.retool.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, helptext in (("sft", "ReTool-SFT → SFT parquet"), ("rl", "DAPO-Math-17k → RL parquet"),
                           ("val", "AIME-style problem/answer table → RL-schema val parquet")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--source", default=DEFAULT_SOURCES["aime24" if name == "val" else name],
                       help="hub id, local dataset dir, or .parquet/.jsonl/.json file")
        s.add_argument("--out", required=True, help="output .parquet path")
        s.add_argument("--split", default="train")
        if name in ("val", "rl"):
            s.add_argument("--data-source", default="aime24" if name == "val" else "dapo_math",
                           help="value of the data_source column (the reward and eval group by it)")
    a = sub.add_parser("all", help="all three into OUT_DIR/{sft,rl}/ (resumes: skips existing outputs)")
    a.add_argument("--out-dir", required=True)
    a.add_argument("--sample", action="store_true", help="use the bundled sample data (offline)")
    a.add_argument("--overwrite", action="store_true")
    for key in DEFAULT_SOURCES:
        a.add_argument(f"--{key}-source", default=None, help=f"default: {DEFAULT_SOURCES[key]}")
    return p.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    try:
        if args.cmd == "sft":
            print(prepare_sft(args.source, args.out, args.split).summary())
        elif args.cmd == "rl":
            print(prepare_rl(args.source, args.out, args.split, args.data_source).summary())
        elif args.cmd == "val":
            print(prepare_val(args.source, args.out, args.data_source, args.split).summary())
        else:
            base = SAMPLE_SOURCES if args.sample else DEFAULT_SOURCES
            sources = {k: getattr(args, f"{k}_source") or base[k] for k in DEFAULT_SOURCES}
            for name, path in prepare_all(args.out_dir, sources, args.overwrite).items():
                print(f"{name}: {path}")
    except DataError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
