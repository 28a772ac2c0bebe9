"""Math reward for ReTool: the final ``\\boxed{}`` answer of the model's *last* turn, checked with math-verify.

verl calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` (keyword
arguments only; configured by ``reward.custom_reward_function.path/name``). The evaluation harness
calls :func:`score_answer` on the final assistant message — the same function ``compute_score``
uses, so training and evaluation cannot disagree about what is correct.

Scoring (``compute_score``):
- correct: ``1.0``;
- wrong or missing answer: ``-1.0``, plus ``tool_bonus`` (default 0.1) per code-interpreter call,
  capped at ``max_wrong_score`` (default -0.6). ``tool_bonus=0`` gives plain ±1.

Facts about the rollout come from the rollout, never from the text. The number of tool calls is
read from what verl hands the reward in ``extra_info`` (:func:`rollout_tool_calls`): the tool
loop's ``tool_rewards`` list (one entry per executed call) and ``num_turns`` (messages in the
trajectory: 2 without tools, +2 per tool round). A caller that observed the calls itself (the
evaluation harness) passes ``num_tool_calls=``. With neither, no bonus is given — typing
``<tool_response>`` earns nothing.

What counts as the answer (:func:`score_answer`): the last ``\\boxed{}`` of the model's final turn,
outside ``<tool_call>`` blocks, fenced or ``<code>`` code and ``<interpreter>``/``<tool_response>``
blocks. verl's ``solution_str`` is the whole decoded response, tool outputs included, and the reward
cannot see the token mask that says who wrote what. What it can trust: every real tool output is
wrapped by the chat template in ``<tool_response>…</tool_response>`` and followed only by model
turns, so the text after the *last* ``</tool_response>`` lies inside the model's final turn. A tag
the model types there can only shorten the scored text (the answer is still the last box), never
bring interpreter output or an earlier turn into it. When ``num_turns`` reports tool rounds but the
text has no such marker (a template that frames tool output differently), no answer is accepted
and a warning is logged, rather than scoring text that may be interpreter output.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any

from recipe.retool.bounded_verify import DEFAULT_TIMEOUT_S, symbolically_equal

logger = logging.getLogger(__name__)

TOOL_OUTPUT_END = "</tool_response>"
_HIDDEN_BLOCKS = re.compile(
    r"<tool_call>.*?(?:</tool_call>|$)|```.*?(?:```|$)|<code>.*?(?:</code>|$)"
    r"|<interpreter>.*?(?:</interpreter>|$)|<tool_response>.*?(?:</tool_response>|$)",
    re.DOTALL,
)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNITS = (
    r"(?:square\s+|sq\.?\s+|cubic\s+)?(?:units?|cm|mm|km|m|meters?|metres?|centimeters?|kilometers?|inch(?:es)?|in|"
    r"feet|foot|ft|yards?|yd|miles?|mi|mph|km/h|seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h|days?|weeks?|"
    r"months?|years?|degrees?|deg|radians?|rad|dollars?|cents?|grams?|g|kg|kilograms?|pounds?|lbs?|liters?|"
    r"litres?|l|ml|ways|people|students|points|percent)(?:\^?\{?[23]\}?)?"
)
_TRAILING_UNIT = re.compile(rf"^(.*?[\d}}])\s+{_UNITS}\.?$", re.IGNORECASE)
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC = re.compile(r"^([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}$|^([-+]?\d+)/(\d+)$")
_MAX_SYMBOLIC_CHARS = 300  # longer "answers" are compared as strings and numbers only
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def final_turn_text(text: str) -> str:
    """The part of ``text`` after the last tool output: within the model's final turn."""
    cut = text.rfind(TOOL_OUTPUT_END)
    return text if cut < 0 else text[cut + len(TOOL_OUTPUT_END):]


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (nested braces handled), or None. Linear time."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    close: dict[int, int] = {}  # position after an opening brace -> position of its closing brace
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i + 1)
        elif ch == "}" and stack:
            close[stack.pop()] = i
    for start in reversed(starts):
        if start in close:
            return text[start:close[start]].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The model's answer in ``text``: last box of the final turn, outside code and tool blocks."""
    return last_boxed(_HIDDEN_BLOCKS.sub(" ", final_turn_text(text)))


def _unwrap_text(s: str) -> str:
    """``\\text{204}`` -> ``204``; a pure-words ``\\text{ cm}`` after a number is a unit and goes."""
    for _ in range(5):  # nested \text{\textbf{...}}
        new = _TEXT_CMD.sub(lambda m: f"\x00{m.group(1)}\x01", s)
        if new == s:
            break
        s = new
    has_number = bool(re.search(r"\d", re.sub(r"\x00[^\x01]*\x01", "", s)))

    def keep(m: re.Match) -> str:
        inner = m.group(1)
        return "" if has_number and re.fullmatch(r"[\sA-Za-z.]*", inner) else inner

    return re.sub(r"\x00([^\x00\x01]*)\x01", keep, s)


def normalize_answer(ans: str) -> str:
    """Surface normalisation before comparison (units, ``\\text``, ``\\dfrac``, separators, ``°``, ``%``)."""
    s = str(ans).strip().strip("$").strip()
    s = _unwrap_text(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("−", "-").replace("{,}", ",")
    for token in ("^\\circ", "^{\\circ}", "\\circ", "°", "\\degree", "\\%", "%", "\\$", "$"):
        s = s.replace(token, "")
    for space in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~"):
        s = s.replace(space, " ")
    s = s.strip().rstrip(".").strip()
    m = _TRAILING_UNIT.match(s)
    if m:
        s = m.group(1).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"(?<=\d) (?=\d{3}\b)", "", s)  # "1 000" -> "1000"
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s.strip()


def _as_number(s: str) -> Fraction | float | None:
    m = _FRAC.match(s.replace(" ", ""))
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    try:
        return float(s)
    except ValueError:
        return None


def judge(pred: str, truth: str, verify_timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, bool]:
    """(equivalent?, timed out?). Numeric first (fast, exact for AIME's integers), then math-verify's
    symbolic equivalence in a child process bounded by ``verify_timeout`` seconds
    (:mod:`recipe.retool.bounded_verify`): a check that runs past it is judged *not* equivalent."""
    p, t = normalize_answer(pred), normalize_answer(str(truth))
    if not p:
        return False, False
    if p == t:
        return True, False
    pn, tn = _as_number(p), _as_number(t)
    if pn is not None and tn is not None:
        return abs(float(pn) - float(tn)) <= 1e-9 * max(1.0, abs(float(tn))), False
    if len(p) > _MAX_SYMBOLIC_CHARS:
        return False, False
    equal = symbolically_equal(f"${t}$", f"${p}$", verify_timeout)
    return bool(equal), equal is None


def is_equivalent(pred: str, truth: str, verify_timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    return judge(pred, truth, verify_timeout)[0]


def rollout_tool_calls(extra_info: dict[str, Any] | None) -> int | None:
    """Tool calls the rollout executed, from verl's rollout metadata; None when it carries none.

    ``tool_rewards`` (from the tool agent loop's extra fields) has one entry per executed call;
    ``num_turns`` counts messages (2 + 2 per tool round), so it gives tool *rounds*, a lower bound
    when a round runs several calls. The larger of the two is used.
    """
    if not extra_info:
        return None
    counts: list[int] = []
    rewards = extra_info.get("tool_rewards")
    if rewards is not None and not isinstance(rewards, (str, bytes, dict)):
        try:
            counts.append(len(rewards))
        except TypeError:
            pass
    rounds = tool_rounds(extra_info)
    if rounds is not None:
        counts.append(rounds)
    return max(counts) if counts else None


def tool_rounds(extra_info: dict[str, Any] | None) -> int | None:
    """Tool rounds whose output entered the response, from ``extra_info['num_turns']``; None if absent."""
    turns = (extra_info or {}).get("num_turns")
    if turns is None:
        return None
    try:
        return max(0, (int(turns) - 2) // 2)
    except (TypeError, ValueError):
        _warn_once("num_turns", "extra_info['num_turns'] is not a number (%r); ignored", turns)
        return None


def score_answer(final_turn: str, ground_truth: str, verify_timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str | None]:
    """(correct?, extracted answer) — the one scoring rule for the RL reward and the evaluation."""
    pred = extract_answer(final_turn)
    return (pred is not None and is_equivalent(pred, ground_truth, verify_timeout)), pred


def shaped_score(correct: bool, tool_calls: int, tool_bonus: float = 0.1, max_wrong_score: float = -0.6) -> float:
    if correct:
        return 1.0
    return min(max_wrong_score, -1.0 + tool_bonus * tool_calls) if tool_bonus else -1.0


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict[str, Any] | None = None,
    tool_bonus: float = 0.1,
    max_wrong_score: float = -0.6,
    num_tool_calls: int | None = None,
    verify_timeout: float = DEFAULT_TIMEOUT_S,
    **_: Any,
) -> dict[str, Any]:
    """verl's entry point. ``num_tool_calls`` overrides the rollout metadata (callers that saw the calls);
    ``verify_timeout`` bounds the symbolic check (seconds; a late check is wrong, and ``verify_timed_out``
    in the result says so: verl logs it with validation metrics and writes it to the rollout dumps)."""
    from_rollout = num_tool_calls is None
    calls = rollout_tool_calls(extra_info) if from_rollout else num_tool_calls
    if calls is None:
        _warn_once("no_meta", "reward: extra_info has neither 'num_turns' nor 'tool_rewards'; "
                   "no tool-use bonus is given (tool calls are never counted from the text)")
        calls = 0
    if from_rollout and (tool_rounds(extra_info) or 0) > 0 and TOOL_OUTPUT_END not in solution_str:
        _warn_once("no_marker", "reward: the rollout ran tool rounds but the response has no '%s' marker; "
                   "the final turn cannot be located and no answer is accepted", TOOL_OUTPUT_END)
        correct, pred, late = False, None, False
    else:
        pred = extract_answer(solution_str)
        correct, late = judge(pred, ground_truth, verify_timeout) if pred is not None else (False, False)
    return {"score": shaped_score(correct, calls, tool_bonus, max_wrong_score), "acc": float(correct),
            "pred": pred or "", "num_tool_calls": int(calls), "verify_timed_out": float(late)}

