"""Prefilter a prepared parquet file by token length, with the target model's chat template.

    python -m recipe.retool.prefilter_dataset --input IN.parquet --output OUT.parquet --tokenizer PATH \
        [--config CONFIG] [key=value ...]
    ./recipe/retool/preprocess_data.sh IN OUT TOKENIZER [--max-prompt-tokens N ...]

The schema is detected from the columns:

- SFT rows (``messages`` [+ ``tools``]): the *prompt* is everything before the first assistant
  turn, rendered with the tool schema and the generation prompt; the *response* is the rest of
  the conversation (assistant turns, tool calls and tool outputs).
- RL rows (``prompt``): the prompt is the chat prompt rendered with the code tool's schema (as
  the rollout renders it); RL rows have no reference response.

The token budget belongs to the config that trains on the data, and is read from it (one owner):

- SFT rows: ``data.max_length`` of the SFT config (prompt + response; default ``retool_sft``);
- RL rows: ``data.max_prompt_length`` of the GRPO config (default ``retool_grpo_template``).

``--config NAME|PATH`` names another config (as ``recipe.retool.train --config`` takes it) and
trailing ``key=value`` overrides apply to it, as they will to the trainer; ``--max-prompt-tokens``,
``--max-response-tokens`` and ``--max-total-tokens`` set a limit outright instead. Rows over the
budget are written, with their lengths, to ``OUT.dropped.parquet`` rather than lost. Tokenizing runs
in ``--workers`` processes (default: all cores), in chunks, with a progress bar.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recipe.retool.data import DataError, load_code_tool_schema, write_parquet

logger = logging.getLogger(__name__)

_TOKENIZER = None
_TOOLS: list[dict[str, Any]] | None = None


# the config that trains on each kind of row, and the keys there that bound it
DEFAULT_CONFIG = {"sft": "retool_sft", "rl": "retool_grpo_template"}


@dataclass(frozen=True)
class Budget:
    """Token limits a row must keep to (None: no limit of that kind), and where they come from."""

    prompt: int | None = None
    response: int | None = None
    total: int | None = None  # prompt + response, as SFT's data.max_length bounds a whole conversation
    source: str = ""

    def keeps(self, prompt: np.ndarray, response: np.ndarray) -> np.ndarray:
        keep = np.ones(len(prompt), dtype=bool)
        for limit, lengths in ((self.prompt, prompt), (self.response, response), (self.total, prompt + response)):
            if limit is not None:
                keep &= lengths <= limit
        return keep

    def describe(self) -> str:
        parts = [f"{name} <= {limit}" for name, limit in
                 (("prompt", self.prompt), ("response", self.response), ("prompt + response", self.total))
                 if limit is not None]
        return f"{', '.join(parts) or 'no limit'} tokens ({self.source})"


def budget_for(kind: str, config: str | None = None, overrides: Sequence[str] = (), max_prompt_tokens: int | None = None,
               max_response_tokens: int | None = None, max_total_tokens: int | None = None) -> Budget:
    """The budget of ``kind`` rows ("sft" or "rl"): from the config that trains on them, unless set outright."""
    explicit = (max_prompt_tokens, max_response_tokens, max_total_tokens)
    if any(v is not None for v in explicit):
        return Budget(*explicit, source="set on the command line")
    from recipe.retool.train import compose, split_config_arg

    name = config or DEFAULT_CONFIG[kind]
    try:
        config_name, config_dir = split_config_arg(name)
        cfg = compose(config_name, list(overrides), config_dir)
    except Exception as exc:
        raise DataError(f"--config {name}: cannot compose it ({type(exc).__name__}: {exc})") from None
    shown = name + (f" with {' '.join(overrides)}" if overrides else "")
    try:
        if kind == "sft":
            return Budget(total=int(cfg.data.max_length), source=f"data.max_length of {shown}")
        return Budget(prompt=int(cfg.data.max_prompt_length), source=f"data.max_prompt_length of {shown}")
    except Exception as exc:
        raise DataError(f"--config {name}: has no {'data.max_length' if kind == 'sft' else 'data.max_prompt_length'} "
                        f"to bound {kind.upper()} rows by ({exc})") from None


@dataclass
class FilterResult:
    kept: int
    dropped: int
    prompt_lengths: np.ndarray
    response_lengths: np.ndarray
    seconds: float
    budget: Budget | None = None

    def summary(self) -> str:
        def stats(x: np.ndarray) -> str:
            if x.size == 0 or not x.any():
                return "n/a"
            p50, p90, p99 = np.percentile(x, [50, 90, 99])
            return f"mean {x.mean():.0f}, p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {x.max()}"

        total = self.kept + self.dropped
        return (
            f"kept {self.kept}/{total} rows, dropped {self.dropped} "
            f"({self.dropped / max(total, 1):.1%}) in {self.seconds:.1f}s\n"
            + (f"  budget: {self.budget.describe()}\n" if self.budget else "") +
            f"  prompt tokens:   {stats(self.prompt_lengths)}\n"
            f"  response tokens: {stats(self.response_lengths)}"
        )


def load_tokenizer(name_or_path: str, local_files_only: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=True, local_files_only=local_files_only)


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached at all (its host does not resolve), else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    return None


def check_tokenizer(name_or_path: str) -> None:
    """Load the tokenizer once here, before any worker starts, and turn a failure into one line.

    Without this every worker process fails on its own (a traceback each, then the pool breaks), and
    a hub id that cannot be reached is retried by every worker in turn."""
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if path.exists() and not path.is_dir():
        raise DataError(f"--tokenizer {name_or_path}: expected a tokenizer directory or a Hugging Face id, got a file")
    if not path.exists() and looks_local:
        raise DataError(f"--tokenizer {name_or_path}: no such directory")
    try:
        if path.exists():
            load_tokenizer(name_or_path)
            return
        try:  # a hub id already in the local cache needs no network
            load_tokenizer(name_or_path, local_files_only=True)
            return
        except Exception:
            if (why := _hub_unreachable()) is not None:
                raise DataError(f"--tokenizer {name_or_path}: not a local directory, not in the Hugging Face cache, "
                                f"and the hub cannot be reached ({why})") from None
        load_tokenizer(name_or_path)
    except DataError:
        raise
    except Exception as exc:
        where = "a local directory" if path.exists() else "not a local directory; as a Hugging Face id"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--tokenizer {name_or_path}: cannot load a tokenizer ({where}: {reason})") from None


def _init_worker(tokenizer_path: str, tools: list[dict[str, Any]] | None) -> None:
    global _TOKENIZER, _TOOLS
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _TOKENIZER = load_tokenizer(tokenizer_path)
    _TOOLS = tools


def _render_len(messages: list[dict[str, Any]], tools, add_generation_prompt: bool) -> int:
    ids = _TOKENIZER.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return len(ids)


def _lengths_sft(row_messages: list[dict[str, Any]], row_tools) -> tuple[int, int]:
    first_assistant = next((i for i, m in enumerate(row_messages) if m.get("role") == "assistant"), len(row_messages))
    prompt_len = _render_len(row_messages[:first_assistant], row_tools, add_generation_prompt=True)
    total_len = _render_len(row_messages, row_tools, add_generation_prompt=False)
    return prompt_len, max(total_len - prompt_len, 0)


def _measure_chunk(chunk: list[tuple[int, str, Any, Any]]) -> list[tuple[int, int, int]]:
    """(row index, kind, messages, tools) → (row index, prompt tokens, response tokens)."""
    out = []
    for index, kind, messages, tools in chunk:
        if kind == "sft":
            p, r = _lengths_sft(messages, tools)
        else:
            p, r = _render_len(messages, tools if tools is not None else _TOOLS, add_generation_prompt=True), 0
        out.append((index, p, r))
    return out


def _to_python(value: Any) -> Any:
    """Parquet gives numpy arrays for lists; the chat template wants plain lists and dicts."""
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    return value


def row_kind(df, path: str) -> str:
    """"sft" (a ``messages`` column) or "rl" (a ``prompt`` column)."""
    if "messages" in df.columns:
        return "sft"
    if "prompt" in df.columns:
        return "rl"
    raise DataError(f"{path}: expected a 'messages' (SFT) or 'prompt' (RL) column; columns: {list(df.columns)}")


def _rows_to_measure(df, path: str) -> Iterable[tuple[int, str, Any, Any]]:
    kind = row_kind(df, path)
    col = "messages" if kind == "sft" else "prompt"
    has_tools = "tools" in df.columns
    for i, messages in enumerate(df[col]):
        messages = _to_python(messages)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{path}, row {i}, field '{col}': expected a list of chat messages, got {type(messages).__name__}")
        tools = _to_python(df["tools"].iloc[i]) if has_tools else None
        if kind == "sft" and tools:
            # parquet fills struct fields missing in one row with None; drop those keys again
            tools = [_drop_none(t) for t in tools]
        yield i, kind, [_drop_none(m) for m in messages], tools


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


def measure_lengths(
    df, path: str, tokenizer: str, workers: int, chunk_size: int = 256, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    tools = [load_code_tool_schema()]
    items = list(_rows_to_measure(df, path))
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    prompt = np.zeros(len(items), dtype=np.int64)
    response = np.zeros(len(items), dtype=np.int64)
    bar = tqdm(total=len(items), desc="tokenizing", unit="row", disable=not progress or None)

    def collect(results: list[tuple[int, int, int]]) -> None:
        for index, p, r in results:
            prompt[index], response[index] = p, r
        bar.update(len(results))

    if workers <= 1:
        _init_worker(tokenizer, tools)
        for chunk in chunks:
            collect(_measure_chunk(chunk))
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(tokenizer, tools)) as pool:
            for results in pool.map(_measure_chunk, chunks):
                collect(results)
    bar.close()
    return prompt, response


def prefilter(
    input_path: str | Path,
    output_path: str | Path,
    tokenizer: str,
    max_prompt_tokens: int | None = None,
    max_response_tokens: int | None = None,
    workers: int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    *,
    max_total_tokens: int | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
) -> FilterResult:
    """Keep the rows within the budget of the config that trains on them (:func:`budget_for`)."""
    import pandas as pd

    start = time.perf_counter()
    check_tokenizer(tokenizer)
    try:
        df = pd.read_parquet(input_path)
    except Exception as exc:
        raise DataError(f"{input_path}: cannot read parquet: {type(exc).__name__}: {exc}") from exc
    budget = budget_for(row_kind(df, str(input_path)), config, overrides, max_prompt_tokens, max_response_tokens,
                        max_total_tokens)
    workers = workers or os.cpu_count() or 1
    prompt, response = measure_lengths(df, str(input_path), tokenizer, workers, chunk_size, progress)
    keep = budget.keeps(prompt, response)
    kept = df[keep].reset_index(drop=True)
    dropped = df[~keep].assign(prompt_tokens=prompt[~keep], response_tokens=response[~keep]).reset_index(drop=True)
    write_parquet(kept.to_dict("records"), output_path)
    dropped_path = Path(str(output_path).removesuffix(".parquet") + ".dropped.parquet")
    if len(dropped):
        write_parquet(dropped.to_dict("records"), dropped_path)
    else:
        dropped_path.unlink(missing_ok=True)
    return FilterResult(int(keep.sum()), int((~keep).sum()), prompt, response, time.perf_counter() - start, budget)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m recipe.retool.prefilter_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="prepared SFT or RL parquet")
    p.add_argument("--output", required=True, help="filtered parquet (dropped rows go to OUTPUT.dropped.parquet)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer id or local path (the model you will train)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config, as the trainer gets them")
    p.add_argument("--config", default=None,
                   help="the config that trains on this data, by name or path (default: retool_sft for SFT rows, "
                        "retool_grpo_template for RL rows); its data.max_length / data.max_prompt_length is the budget")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="a limit set outright instead of --config's")
    p.add_argument("--max-response-tokens", type=int, default=None, help="a limit set outright instead of --config's")
    p.add_argument("--max-total-tokens", type=int, default=None, help="a limit set outright instead of --config's")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per task sent to a worker")
    args = p.parse_intermixed_args(argv)
    try:
        result = prefilter(args.input, args.output, args.tokenizer, args.max_prompt_tokens,
                           args.max_response_tokens, args.workers, args.chunk_size,
                           max_total_tokens=args.max_total_tokens, config=args.config, overrides=args.overrides)
    except DataError as err:
        logger.error("%s", err)
        return 2
    print(f"{args.input} → {args.output}: {result.summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
