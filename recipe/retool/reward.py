"""Math reward for ReTool: the final ``\\boxed{}`` answer of the model's *last* turn, checked with math-verify.

verl calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` (keyword
arguments only; configured by ``reward.custom_reward_function.path/name``). The evaluation harness
calls :func:`score_answer` — one implementation for training and evaluation.

Scoring (``score``):
- correct: ``1.0``;
- wrong or missing answer: ``-1.0``, plus ``tool_bonus`` (default 0.1) per code-interpreter call,
  capped at ``max_wrong_score`` (default -0.6). With GRPO's per-group normalisation, 1/-1 and 1/0
  rank samples identically; the negative base is what lets the small tool-use bonus order *wrong*
  answers (more attempted computation ranks higher) without ever reaching a correct one. Set
  ``tool_bonus=0`` (``+reward.custom_reward_function.reward_kwargs.tool_bonus=0``) for plain ±1.

``acc`` is 1.0/0.0 and is what the pass@k metrics use; ``pred`` is the extracted answer.

What counts as the answer: ``solution_str`` is the whole decoded multi-turn response, tool outputs
included. Only text after the last tool output counts, and inside it ``<tool_call>`` blocks and
fenced code are ignored: an answer printed by the interpreter, or boxed only inside code, is not
the model's final answer.
"""

from __future__ import annotations

import re
import threading
from typing import Any

_TOOL_RESPONSE_END = re.compile(r"</tool_response>|<\|im_start\|>\s*(?:user|tool)|<interpreter>.*?</interpreter>", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.DOTALL)
_CODE_FENCE = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_CODE_TAG = re.compile(r"<code>.*?(?:</code>|$)", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{[^{}]*\}")


def last_turn(solution: str) -> str:
    """The text the model wrote after the last tool output."""
    ends = list(_TOOL_RESPONSE_END.finditer(solution))
    return solution[ends[-1].end():] if ends else solution


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces handled), or None."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def extract_answer(solution: str) -> str | None:
    visible = _CODE_TAG.sub(" ", _CODE_FENCE.sub(" ", _TOOL_CALL.sub(" ", last_turn(solution))))
    return last_boxed(visible)


def _normalize(ans: str) -> str:
    s = _TEXT_CMD.sub("", ans)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def is_equivalent(pred: str, truth: str) -> bool:
    """Numeric first (fast, exact for AIME's integers), then math-verify's symbolic equivalence."""
    p, t = _normalize(pred), _normalize(str(truth))
    if p == t:
        return True
    pn, tn = _as_number(p), _as_number(t)
    if pn is not None and tn is not None:
        return abs(pn - tn) <= 1e-9 * max(1.0, abs(tn))
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a declared dependency
        return False
    # math-verify's time-outs use signals, which only work in the main thread (verl's reward
    # workers call us elsewhere): disable them there.
    main = threading.current_thread() is threading.main_thread()
    kw = {} if main else {"parsing_timeout": None}
    try:
        gold = parse(f"${t}$", **kw)
        guess = parse(f"${p}$", **kw)
        if not gold or not guess:
            return False
        return bool(verify(gold, guess, **({} if main else {"timeout_seconds": None})))
    except Exception:
        return False


def count_tool_calls(solution: str) -> int:
    return len(re.findall(r"<tool_response>|<interpreter>", solution))


def score_answer(solution: str, ground_truth: str) -> tuple[bool, str | None]:
    """(correct?, extracted answer) — shared by the RL reward and the evaluation harness."""
    pred = extract_answer(solution)
    return (pred is not None and is_equivalent(pred, ground_truth)), pred


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict[str, Any] | None = None,
    tool_bonus: float = 0.1,
    max_wrong_score: float = -0.6,
    **_: Any,
) -> dict[str, Any]:
    correct, pred = score_answer(solution_str, ground_truth)
    calls = count_tool_calls(solution_str)
    if correct:
        score = 1.0
    else:
        score = min(max_wrong_score, -1.0 + tool_bonus * calls) if tool_bonus else -1.0
    return {"score": score, "acc": float(correct), "pred": pred or "", "num_tool_calls": calls}
