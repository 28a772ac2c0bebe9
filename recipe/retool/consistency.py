"""Consistency of the GRPO loop, measured every step: is the trainer learning from what the rollout did?

The failures users of ReTool recipes report pass every plumbing test: the engine's log-probabilities
drift away from the actor's, the conversation the engine continued is not the one the chat template
renders (a separator lost at each tool boundary, a tool output tokenized differently), the model
stops calling the tool or calls it badly. Three families of metrics, all in verl's step metrics
(``consistency/…``), computed by the pure functions here:

1. **log-probabilities** (:func:`logprob_gap`): on the tokens the rollout generated, the absolute
   difference between the rollout engine's log-probability and the trainer's (verl's ``old_log_probs``,
   the actor before its update, i.e. the same weights): mean, max, and the share of tokens above
   ``retool.consistency.logprob_tol``. verl's own ``training/rollout_probs_diff_*`` compares
   probabilities, where a token the engine found unlikely hides any gap;
2. **token drift** (:func:`token_drift`): for a sample of trajectories, the ids the rollout built
   (prompt, generated turns, tool outputs and the separators between them) against the chat
   template's render of the same conversation. The generated turns are taken as the model wrote
   them (their text must come back unchanged; their ids are what both sides score); every other
   token must be the template's. The first mismatch is kept with its position and decoded context;
3. **tool-call health** (:func:`turn_calls`, :func:`tool_health`): the share of assistant turns with
   a tool call that does not parse or does not fit the tool's schema, tool calls per trajectory,
   and the share of trajectories cut by the turn limit or the length limit.

The rollout side records (2) and (3) per trajectory (:class:`Record`, made by the recipe's agent loop,
:mod:`recipe.retool.agent_loop`); the trainer side (the recipe's verl plugin) turns a step's records
and log-probabilities into metrics with :func:`step_metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PREFIX = "consistency"
RECORD_KEY = "retool_consistency"  # the trajectory's record, in verl's extra_fields
DRIFT_FILE = "token_drift.jsonl"  # the first drift of each step, beside verl's metrics file
CUT_TURNS, CUT_LENGTH = "turns", "length"
CONTEXT_CHARS = 40  # decoded text kept on each side of a drift


# ----------------------------------------------------------------------------- 1. log-probabilities


def logprob_gap(rollout, actor, mask, tol: float | None) -> dict[str, float]:
    """|rollout − trainer| log-probability over the generated tokens (``mask`` 1). Tensors of one
    shape (rows × tokens); nothing when no token is generated."""
    import torch

    keep = torch.as_tensor(mask).bool()
    if not bool(keep.any()):
        return {}
    diff = (torch.as_tensor(rollout, dtype=torch.float64) - torch.as_tensor(actor, dtype=torch.float64)).abs()[keep]
    out = {f"{PREFIX}/logprob_diff/mean": diff.mean().item(), f"{PREFIX}/logprob_diff/max": diff.max().item()}
    if tol is not None:
        out[f"{PREFIX}/logprob_diff/share_above_tol"] = (diff > tol).double().mean().item()
    return out


# ----------------------------------------------------------------------------- 2. token drift


@dataclass(frozen=True)
class Drift:
    """Where the rollout's ids first part from the template's render of the same conversation."""

    position: int  # token index in prompt + response
    where: str  # prompt | context (a tool output or a separator) | generated
    rollout: str  # decoded rollout text around the position
    template: str  # the template's text around the same place
    retokenized: bool = False  # same text, other ids (a piece tokenized on its own)


def runs(prompt_len: int, response_mask: Sequence[int]) -> list[tuple[str, int, int]]:
    """The sequence as (kind, start, end) runs: the prompt, then alternating generated tokens (mask 1)
    and context the rollout inserted (mask 0: tool outputs, turn separators, generation prompts)."""
    out = [("prompt", 0, prompt_len)] if prompt_len else []
    for i, m in enumerate(response_mask):
        kind = "generated" if m else "context"
        if out and out[-1][0] == kind and out[-1][2] == prompt_len + i:
            out[-1] = (kind, out[-1][1], prompt_len + i + 1)
        else:
            out.append((kind, prompt_len + i, prompt_len + i + 1))
    return out


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def rerender_messages(tokenizer, messages: Sequence[Mapping], prompt_messages: int,
                      generated: Sequence[Sequence[int]]) -> list[dict]:
    """The conversation as the template should render it: each assistant turn's content is exactly
    the text the model generated (its end-of-turn token left to the template, tool calls inline as
    written: a parsed and re-serialised call would differ in spacing, not in what the model saw);
    tool and prompt messages as the rollout had them. A generated turn the rollout cut before it
    became a message (the turn or length limit) is appended."""
    special = set(tokenizer.all_special_ids)
    texts = [_decode(tokenizer, ids[:-1] if ids and ids[-1] in special else ids) for ids in generated]
    out, turn = [dict(m) for m in messages[:prompt_messages]], 0
    for message in messages[prompt_messages:]:
        if message.get("role") == "assistant":
            out.append({"role": "assistant", "content": texts[turn] if turn < len(texts) else message.get("content", "")})
            turn += 1
        else:
            out.append(dict(message))
    out += [{"role": "assistant", "content": text} for text in texts[turn:]]
    return out


def _first_divergence(tokenizer, ids: Sequence[int], rendered: str) -> int:
    """Index of the first token of ``ids`` whose text no longer follows ``rendered`` (a bisection:
    once the texts part they stay apart, and a run may be thousands of tokens)."""
    lo, hi = 0, len(ids)  # ids[:lo] follows; ids[:hi + 1] does not (or hi == len)
    while lo < hi:
        mid = (lo + hi) // 2
        if rendered.startswith(_decode(tokenizer, ids[: mid + 1])):
            lo = mid + 1
        else:
            hi = mid
    return lo


def token_drift(tokenizer, messages: Sequence[Mapping], prompt_messages: int, prompt_ids: Sequence[int],
                response_ids: Sequence[int], response_mask: Sequence[int], *, tools: list[dict] | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> Drift | None:
    """The first place where the rollout's ids differ from the chat template's render of the same
    conversation (``messages``: the rollout's, the first ``prompt_messages`` of them the dataset's
    prompt), or None. The render may go on past the rollout's end (a cut last turn, a tool output
    the length limit kept out); the rollout may not go past the render."""
    ids = [*prompt_ids, *response_ids]
    spans = runs(len(prompt_ids), response_mask[: len(response_ids)])
    generated = [ids[s:e] for kind, s, e in spans if kind == "generated"]
    conversation = rerender_messages(tokenizer, messages, prompt_messages, generated)
    rendered = tokenizer.apply_chat_template(conversation, tools=tools or None, tokenize=False,
                                             add_generation_prompt=False, **dict(template_kwargs or {}))
    cursor = 0
    for kind, start, end in spans:
        piece = ids[start:end]
        text = _decode(tokenizer, piece)
        if not rendered.startswith(text, cursor):
            i = _first_divergence(tokenizer, piece, rendered[cursor:])
            at = cursor + len(_decode(tokenizer, piece[:i]))
            return _drift(tokenizer, ids, start + i, kind, rendered, at)
        if kind != "generated" and (expected := _encode(tokenizer, text)) != list(piece):
            i = next((k for k, (a, b) in enumerate(zip(piece, expected)) if a != b), min(len(piece), len(expected)))
            at = cursor + len(_decode(tokenizer, piece[:i]))
            return _drift(tokenizer, ids, start + i, kind, rendered, at, retokenized=True)
        cursor += len(text)
    return None


def _drift(tokenizer, ids: Sequence[int], position: int, kind: str, rendered: str, at: int,
           retokenized: bool = False) -> Drift:
    before = _decode(tokenizer, ids[:position])[-CONTEXT_CHARS:]
    after = _decode(tokenizer, ids[position:])[:CONTEXT_CHARS]
    return Drift(position=position, where=kind, rollout=before + "⟦" + after,
                 template=rendered[max(0, at - CONTEXT_CHARS):at] + "⟦" + rendered[at:at + CONTEXT_CHARS],
                 retokenized=retokenized)


def noncanonical(tokenizer, generated: Iterable[Sequence[int]]) -> bool:
    """Whether a generated turn's ids are not the tokenizer's own encoding of its text. Not drift
    (the trainer scores the ids the model sampled), but what a server re-rendering the history from
    text would show the model instead."""
    return any(_encode(tokenizer, _decode(tokenizer, ids)) != list(ids) for ids in generated)


# ----------------------------------------------------------------------------- 3. tool-call health


def tool_call_blocks(text: str, start: str = "<tool_call>", end: str = "</tool_call>") -> list[str | None]:
    """The tool-call blocks of an assistant turn (hermes format, what verl's ``hermes`` parser reads);
    None for a block opened and never closed."""
    blocks: list[str | None] = []
    at = text.find(start)
    while at >= 0:
        close = text.find(end, at + len(start))
        if close < 0:
            blocks.append(None)
            break
        blocks.append(text[at + len(start):close])
        at = text.find(start, close + len(end))
    return blocks


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def call_problem(block: str | None, schemas: Mapping[str, Mapping]) -> str | None:
    """Why a tool-call block is not a call the tool can run, or None. ``schemas``: tool name → its
    OpenAI function schema (``{"name", "parameters": {...}}``)."""
    if block is None:
        return "never closed"
    try:
        call = json.loads(block)
    except ValueError:
        return "not JSON"
    if not isinstance(call, dict) or "name" not in call or "arguments" not in call:
        return "no name and arguments"
    schema = schemas.get(call["name"]) if isinstance(call["name"], str) else None
    if schema is None:
        return f"unknown tool {call['name']!r}"
    args = call["arguments"]
    if not isinstance(args, dict):
        return "arguments are not an object"
    params = schema.get("parameters") or {}
    missing = [p for p in params.get("required") or () if p not in args]
    if missing:
        return f"missing argument {missing[0]!r}"
    for name, value in args.items():
        declared = _JSON_TYPES.get(((params.get("properties") or {}).get(name) or {}).get("type"))
        if declared and (not isinstance(value, declared) or (declared is int and isinstance(value, bool))):
            return f"argument {name!r} is not of its declared type"
    return None


def turn_calls(text: str, schemas: Mapping[str, Mapping], finished: bool = True) -> tuple[int, list[str]]:
    """(tool-call blocks, problems) of one assistant turn. A block left open by a turn that did not
    finish (cut by the length limit) is the cut's, not the model's fault: not a problem."""
    blocks = tool_call_blocks(text)
    problems = [p for b in blocks if (p := call_problem(b, schemas)) and (finished or b is not None)]
    return len(blocks), problems


def tool_schemas(schemas: Iterable[Mapping]) -> dict[str, Mapping]:
    """Tool name → function schema, from verl's tool schemas (``{"type": "function", "function": {...}}``)."""
    out = {}
    for s in schemas:
        fn = s.get("function", s)
        out[fn["name"]] = fn
    return out


# ----------------------------------------------------------------------------- per trajectory, per step


@dataclass
class Record:
    """What the rollout records of one trajectory (in verl's ``extra_fields``, under :data:`RECORD_KEY`)."""

    assistant_turns: int = 0
    invalid_turns: int = 0  # turns with a tool call that does not parse or fit its schema
    calls_read: bool = True  # whether its turns were read for tool calls (the hermes format only)
    tool_calls: int = 0  # calls the loop ran
    cut: str = ""  # turns | length | "" (ended on its own)
    drift_checked: bool = False
    drift: dict | None = None  # a Drift, as a dict
    noncanonical: bool = False
    problems: list[str] = field(default_factory=list)  # the first few, for reading a trajectory

    def as_dict(self) -> dict:
        return asdict(self)


def drift_rate(sample: int, train_batch_size: int, n: int) -> float:
    """The chance of each trajectory being checked for token drift, for about ``sample`` a step
    (``retool.consistency.drift_sample``; a step has ``train_batch_size`` × ``n`` trajectories)."""
    if sample < 0:
        raise ValueError(f"retool.consistency.drift_sample must be 0 or more, got {sample}")
    return min(1.0, sample / max(1, train_batch_size * n))


def tool_health(records: Sequence[Mapping]) -> dict[str, float]:
    """Tool-call health of a step's trajectories (their :class:`Record` dicts)."""
    if not records:
        return {}
    read = [r for r in records if r.get("calls_read", True)]  # another tool-call format: not read, not counted
    turns = sum(r["assistant_turns"] for r in read)
    n = len(records)
    invalid = {f"{PREFIX}/tool_calls/invalid_turn_share": sum(r["invalid_turns"] for r in read) / turns if turns else 0.0}
    return {
        **(invalid if read else {}),
        f"{PREFIX}/tool_calls/per_trajectory": sum(r["tool_calls"] for r in records) / n,
        f"{PREFIX}/cut/turn_limit_share": sum(r["cut"] == CUT_TURNS for r in records) / n,
        f"{PREFIX}/cut/length_limit_share": sum(r["cut"] == CUT_LENGTH for r in records) / n,
    }


def drift_metrics(records: Sequence[Mapping]) -> tuple[dict[str, float], dict | None]:
    """Token drift of a step: (metrics, the first drift found or None). Metrics only when some
    trajectory was checked."""
    checked = [r for r in records if r.get("drift_checked")]
    if not checked:
        return {}, None
    drifted = [r["drift"] for r in checked if r.get("drift")]
    metrics = {f"{PREFIX}/token_drift/checked": float(len(checked)),
               f"{PREFIX}/token_drift/mismatched": float(len(drifted)),
               f"{PREFIX}/token_drift/noncanonical": float(sum(bool(r.get("noncanonical")) for r in checked))}
    if drifted:
        metrics[f"{PREFIX}/token_drift/first_position"] = float(drifted[0]["position"])
    return metrics, (drifted[0] if drifted else None)


def records_of(extra_fields: Iterable[Any]) -> list[dict]:
    """The :class:`Record` dicts among a step's trajectories' ``extra_fields`` (trajectories of
    another agent loop have none)."""
    return [f[RECORD_KEY] for f in extra_fields if isinstance(f, dict) and isinstance(f.get(RECORD_KEY), dict)]


# ----------------------------------------------------------------------------- over a run


def run_summary(steps: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """A run's consistency from its steps' metrics: the worst log-prob gap and the mean one, drift
    counts summed, tool-call shares averaged over steps. Empty when no step has the metrics."""
    rows = [m for _, m in sorted(steps.items()) if any(k.startswith(f"{PREFIX}/") for k in m)]
    if not rows:
        return {}

    def values(key: str) -> list[float]:
        return [m[f"{PREFIX}/{key}"] for m in rows if f"{PREFIX}/{key}" in m]

    out: dict[str, float] = {"steps": float(len(rows))}
    for key, how in (("logprob_diff/mean", "mean"), ("logprob_diff/max", "max"), ("logprob_diff/share_above_tol", "mean"),
                     ("token_drift/checked", "sum"), ("token_drift/mismatched", "sum"), ("token_drift/noncanonical", "sum"),
                     ("tool_calls/invalid_turn_share", "mean"), ("tool_calls/per_trajectory", "mean"),
                     ("cut/turn_limit_share", "mean"), ("cut/length_limit_share", "mean")):
        if v := values(key):
            out[key] = {"mean": sum(v) / len(v), "max": max(v), "sum": sum(v)}[how]
    return out


def first_drift(run_dir) -> dict | None:
    """The first token drift a run wrote (``token_drift.jsonl`` beside its metrics), or None."""
    from pathlib import Path

    path = Path(run_dir) / DRIFT_FILE
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.strip():
            return json.loads(line)
    return None


def consistency_rows(name: str, checks: dict[str, Any]) -> list[str]:
    """The report card's consistency lines of one GRPO run (recipe/retool/consistency.py; targets in
    docs/miniature.md): rollout vs trainer log-probs, token drift, tool-call health."""
    c, drift = checks.get("summary") or {}, checks.get("first_drift")
    if not c:
        return [f"- {name}: consistency not measured (the recipe's verl plugin was not loaded: install the package)"]
    rows = []
    if "logprob_diff/max" in c:
        rows.append(f"- {name}: rollout vs trainer log-probs, |Δ| on generated tokens over {c['steps']:.0f} steps: "
                    f"mean {c['logprob_diff/mean']:.2e}, max {c['logprob_diff/max']:.2e}, "
                    f"tokens above the tolerance {100 * c.get('logprob_diff/share_above_tol', float('nan')):.2f}%")
    if "token_drift/checked" in c:
        line = (f"- {name}: token drift against the chat template: {c['token_drift/mismatched']:.0f} of "
                f"{c['token_drift/checked']:.0f} checked trajectories")
        if drift:
            line += (f"; first at step {drift['step']}, token {drift['position']} ({drift['where']}): rollout "
                     f"`{drift['rollout']!r}`, template `{drift['template']!r}`")
        rows.append(line)
    if "tool_calls/per_trajectory" in c:
        rows.append(f"- {name}: tool calls per trajectory {c['tool_calls/per_trajectory']:.2f}, assistant turns with an "
                    f"invalid call {100 * c['tool_calls/invalid_turn_share']:.1f}%, trajectories cut by the turn limit "
                    f"{100 * c['cut/turn_limit_share']:.1f}% and by the length limit {100 * c['cut/length_limit_share']:.1f}% "
                    f"(means over steps)")
    return rows


def run_checks(run_dir) -> dict[str, Any]:
    """A GRPO run's consistency, from the files it left (its metrics and its first token drift):
    what :func:`consistency_rows` reports."""
    from recipe.retool.metrics import read_metrics

    return {"summary": run_summary(read_metrics(run_dir)), "first_drift": first_drift(run_dir)}
