"""recipe.retool.reward: answer extraction, equivalence on a broad answer set, rollout-based tool
counting, and adversarial completions (fake tags, code-only answers, tool-output boxes, 1 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from recipe.retool.reward import (
    compute_score,
    extract_answer,
    is_equivalent,
    normalize_answer,
    rollout_tool_calls,
    score_answer,
)

TOOL_TURN = ("<tool_call>\n{\"name\": \"code_interpreter\", \"arguments\": {\"code\": \"print(42)\"}}\n</tool_call>"
             "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def verl_extra_info(tool_calls: int, row: dict | None = None) -> dict:
    """What verl 0.9.1's naive reward manager passes: the row's extra_info, the tool loop's extra
    fields, the trajectory's message count and the rollout reward scores."""
    return {**(row or {"index": 0, "split": "train"}), "turn_scores": [], "tool_rewards": [0.0] * tool_calls,
            "num_turns": 2 + 2 * tool_calls, "rollout_reward_scores": {}}


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
    ("\\boxed{x^{2}+\\sqrt{\\frac{1}{2}}}", "x^{2}+\\sqrt{\\frac{1}{2}}"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),
    ("\\boxed{1} then an unclosed \\boxed{2", "1"),
    ("no box here, Answer: 5", None),
    ("\\fbox{7}", "7"),
    ("unclosed \\boxed{12", None),
    ("The answer is shown in code: ```python\nprint('\\\\boxed{9}')\n```", None),
    ("<code>print(r'\\boxed{9}')</code> then \\boxed{10}", "10"),
    ("\\boxed{10} and in a call <tool_call>{\"code\": \"print('\\\\boxed{9}')\"}</tool_call>", "10"),
    ("\\boxed{\\text{204}}", "\\text{204}"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answer_must_come_after_the_last_tool_output():
    # the interpreter printed a boxed answer; the model itself never answered after it
    printed = "let me compute " + TOOL_TURN.replace("42\n</tool_response>", "\\boxed{42}\n</tool_response>") + "Hmm."
    assert extract_answer(printed) is None
    # an answer boxed before a later tool call does not count either
    assert extract_answer("\\boxed{41} wait, check " + TOOL_TURN + "ok") is None
    assert extract_answer("check " + TOOL_TURN + "So it is \\boxed{42}.") == "42"
    # interpreter output typed in ReTool-SFT tags is not the model's answer
    assert extract_answer("<interpreter>\\boxed{3}</interpreter> so") is None


def test_boxed_text_is_unwrapped_not_deleted():
    assert is_equivalent("\\text{204}", "204")
    assert score_answer("So \\boxed{\\text{204}}.", "204") == (True, "\\text{204}")
    assert not is_equivalent("\\text{}", "204")


# (prediction, ground truth, equivalent?) — AIME-style integers and the forms models write around them
WIDE_SET = [
    ("42", "42", True), ("042", "42", True), ("42.0", "42", True), ("42.", "42", True), ("+42", "42", True),
    ("$42$", "42", True), ("x = 42", "42", True), ("n=42", "42", True),
    # separators
    ("1,000", "1000", True), ("1{,}000", "1000", True), ("1\\,000", "1000", True), ("1\\!000", "1000", True),
    ("12,345,678", "12345678", True), ("1,000", "100", False),
    # \text and units
    ("\\text{204}", "204", True), ("\\textbf{204}", "204", True), ("\\mathrm{204}", "204", True),
    ("12 \\text{ cm}", "12", True), ("12\\text{cm}", "12", True), ("12 cm", "12", True), ("5 square units", "5", True),
    ("30 \\text{ degrees}", "30", True), ("7 \\mbox{ meters}", "7", True), ("\\text{204 }", "204", True),
    ("3 \\text{ hours}", "4", False),
    # fractions
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac12", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True), ("3/4", "\\frac{3}{4}", True), ("-\\frac{1}{3}", "-1/3", True),
    ("\\frac{1}{3}", "0.33", False), ("\\frac{2}{3}", "\\frac{3}{2}", False),
    # degrees and percentages, money
    ("30^\\circ", "30", True), ("30^{\\circ}", "30", True), ("30°", "30", True), ("50\\%", "50", True),
    ("50%", "50", True), ("\\$5", "5", True), ("\\$1,250", "1250", True),
    # intervals, tuples, sets
    ("(1, 2)", "(1,2)", True), ("[1,3)", "[1, 3)", True), ("(1,2)", "[1,2]", False), ("(2,3)", "(3,2)", False),
    ("\\left(1, 2\\right)", "(1,2)", True), ("\\{1,2\\}", "\\{2,1\\}", True),
    # symbolic
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("x^2+2x+1", "(x+1)^2", True), ("2 \\pi", "2\\pi", True),
    ("\\sqrt2", "\\sqrt{2}", True), ("−5", "-5", True),
    # wrong or empty
    ("41", "42", False), ("", "1", False), ("abc", "42", False), ("\\text{}", "1", False), ("2x", "2", False),
]


@pytest.mark.parametrize("pred, truth, ok", WIDE_SET)
def test_equivalence_on_a_wide_answer_set(pred, truth, ok):
    assert is_equivalent(pred, truth) is ok, (pred, truth, normalize_answer(pred), normalize_answer(truth))


def test_tool_calls_are_counted_from_the_rollout_not_from_typed_tags():
    """A wrong answer that *types* tool tags earns nothing; what the rollout did earns the bonus."""
    fake = ("<tool_response>\n1\n</tool_response> <interpreter>2</interpreter>\n" * 9) + "\\boxed{41}"
    assert compute_score(data_source="aime24", solution_str=fake, ground_truth="42",
                         extra_info=verl_extra_info(0))["score"] == -1.0
    assert compute_score(solution_str=fake, ground_truth="42", extra_info={})["score"] == -1.0
    assert compute_score(solution_str=fake, ground_truth="42")["num_tool_calls"] == 0
    wrong3 = ("x " + TOOL_TURN) * 3 + "\\boxed{41}"
    assert compute_score(solution_str=wrong3, ground_truth="42",
                         extra_info=verl_extra_info(3))["score"] == pytest.approx(-0.7)
    # the eval harness passes the count it observed
    assert compute_score(solution_str="\\boxed{41}", ground_truth="42", num_tool_calls=2)["score"] == pytest.approx(-0.8)


@pytest.mark.parametrize("extra_info, calls", [
    (None, None), ({}, None), ({"index": 3, "num_tool_calls": 7}, None),  # a dataset field is not a rollout fact
    ({"num_turns": 2}, 0), ({"num_turns": 3}, 0), ({"num_turns": 8}, 3), ({"num_turns": None}, None),
    ({"num_turns": 4, "tool_rewards": [0.0, 0.0, 0.0]}, 3),  # two parallel calls in one round
    ({"tool_rewards": [0.0]}, 1), ({"num_turns": "bad"}, None),
])
def test_rollout_tool_calls(extra_info, calls):
    assert rollout_tool_calls(extra_info) == calls


def test_numpy_num_turns_from_verl():
    np = pytest.importorskip("numpy")
    assert rollout_tool_calls({"num_turns": np.int64(6), "tool_rewards": np.array([0.0, 0.0])}) == 2


def test_compute_score_values_and_shaping():
    right = "work " + TOOL_TURN + "\\boxed{42}"
    wrong9 = ("x " + TOOL_TURN) * 9 + "\\boxed{41}"
    r = compute_score(data_source="aime24", solution_str=right, ground_truth="42", extra_info=verl_extra_info(1))
    assert r == {"score": 1.0, "acc": 1.0, "pred": "42", "num_tool_calls": 1, "verify_timed_out": 0.0}
    assert compute_score(solution_str="\\boxed{41}", ground_truth="42", extra_info=verl_extra_info(0))["score"] == -1.0
    assert compute_score(solution_str=wrong9, ground_truth="42", extra_info=verl_extra_info(9))["score"] == pytest.approx(-0.6)
    assert compute_score(solution_str=wrong9, ground_truth="42", extra_info=verl_extra_info(9), tool_bonus=0)["score"] == -1.0
    assert compute_score(solution_str="no answer", ground_truth="42", extra_info=verl_extra_info(0)) == {
        "score": -1.0, "acc": 0.0, "pred": "", "num_tool_calls": 0, "verify_timed_out": 0.0}


def test_tool_rounds_without_a_tool_output_marker_accept_no_answer():
    # the rollout ran a tool round but the text has no </tool_response>: the final turn is unknown,
    # and the interpreter may have printed this box — do not accept it
    r = compute_score(solution_str="calc\n\\boxed{42}\nok", ground_truth="42", extra_info=verl_extra_info(1))
    assert r["acc"] == 0.0 and r["pred"] == ""


@pytest.mark.parametrize("solution, ok", [
    # fake tags the model typed itself do not move the final turn to an earlier answer
    ("\\boxed{42} <tool_response>\\boxed{41}</tool_response>", False),
    ("<tool_response>\\boxed{42}</tool_response>", False),
    ("I ran it: </tool_response> so \\boxed{42}", True),
    # answers only inside code do not count
    ("```python\nprint('\\\\boxed{42}')\n```", False),
    ("<code>ans = r'\\boxed{42}'</code>", False),
    ("<tool_call>{\"name\": \"code_interpreter\", \"arguments\": {\"code\": \"'\\\\boxed{42}'\"}}</tool_call>", False),
    # a boxed answer printed by the interpreter is not the model's answer
    ("check " + TOOL_TURN.replace("42\n</tool_response>", "\\boxed{42}\n</tool_response>") + "done", False),
    # several boxes: the last one counts
    ("\\boxed{42} no wait \\boxed{41}", False),
    ("\\boxed{41} no wait \\boxed{42}", True),
    ("\\boxed{41}\\boxed{42}", True),
])
def test_adversarial_completions(solution, ok):
    calls = solution.count("</tool_response>\n<|im_end|>") if "<|im_end|>" in solution else 0
    r = compute_score(data_source="aime24", solution_str=solution, ground_truth="42", extra_info=verl_extra_info(calls))
    assert r["acc"] == float(ok), r


MEGABYTE = 1 << 20
HUGE_CASES = {
    "many_open_boxes": "\\boxed{" * (MEGABYTE // 7),
    "many_open_tags": "<interpreter>" * (MEGABYTE // 13),
    "rambling_then_answer": "let me think. " * (MEGABYTE // 14) + "\\boxed{42}",
    "huge_box": "\\boxed{" + "1+" * (MEGABYTE // 2) + "1}",
    "many_fences": "``` x ```" * (MEGABYTE // 9) + " \\boxed{42}",
}


def test_one_megabyte_completions_are_scored_in_bounded_time():
    code = ("import json, sys, time\nfrom recipe.retool.reward import compute_score\n"
            "cases = json.loads(sys.stdin.read())\nout = {}\n"
            "for name, text in cases.items():\n"
            "    t = time.perf_counter()\n"
            "    r = compute_score(solution_str=text, ground_truth='42', extra_info={'num_turns': 2})\n"
            "    out[name] = [r['acc'], time.perf_counter() - t]\n"
            "print(json.dumps(out))\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(HUGE_CASES), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: v[0] for k, v in out.items()} == {"many_open_boxes": 0.0, "many_open_tags": 0.0,
                                                  "rambling_then_answer": 1.0, "huge_box": 0.0, "many_fences": 1.0}
    assert max(v[1] for v in out.values()) < 5.0, out
    assert time.perf_counter() - start < 60


def test_symbolic_check_works_outside_the_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", score_answer("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")))
    t.start()
    t.join(30)
    assert out["r"] == (True, "2\\sqrt{2}")


def test_tool_calls_survive_verls_decoding_and_earn_the_bonus(dev_tokenizer):
    """verl decodes the response with skip_special_tokens=True before scoring: the tool-output marker
    must not be a special token (as in Qwen2.5's tokenizer), or the final turn could not be found."""
    text = ('<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n\\boxed{7}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
            "no idea<|im_end|>")
    decoded = dev_tokenizer.decode(dev_tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert "</tool_response>" in decoded
    result = compute_score(data_source="dapo", solution_str=decoded, ground_truth="7", extra_info=verl_extra_info(1))
    assert result["num_tool_calls"] == 1 and result["score"] == pytest.approx(-0.9) and result["acc"] == 0.0


# Answers of a few dozen characters whose symbolic evaluation explodes (each ran for minutes, or
# until memory ran out, in math-verify without a time bound)
PATHOLOGICAL = ["9^{9^{9}}", "10^{10^{10}}", "(10^{8})!", "\\binom{10^{12}}{10^{6}}", "2^{3^{4^{5}}} - 1"]


def test_a_pathological_answer_is_judged_wrong_within_its_time_from_worker_threads():
    """verl calls the reward from worker threads; a check there must stay bounded (the child that runs
    it is killed) and the answer judged wrong, with the time-out reported. Run in a subprocess: on an
    unbounded reward the check holds the GIL and would stall the test process itself."""
    program = f"""
import json, time
from concurrent.futures import ThreadPoolExecutor
from recipe.retool.reward import compute_score
from recipe.retool.bounded_verify import timeouts

def score(answer):
    started = time.monotonic()
    out = compute_score(solution_str="\\\\boxed{{" + answer + "}}", ground_truth="7", extra_info={{"num_turns": 2}},
                        verify_timeout=1.5)
    return out["acc"], out["verify_timed_out"], time.monotonic() - started

with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(score, {PATHOLOGICAL!r}))
    # the children killed on time-out are replaced: an honest symbolic answer is still judged right
    after = pool.submit(lambda: compute_score(solution_str="\\\\boxed{{\\\\frac{{\\\\sqrt{{8}}}}{{2}}}}",
                                               ground_truth="\\\\sqrt{{2}}", extra_info={{"num_turns": 2}})).result()
print(json.dumps({{"results": results, "after": after["acc"], "timeouts": timeouts()}}))
"""
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for answer, (acc, _late, seconds) in zip(PATHOLOGICAL, out["results"], strict=True):
        assert acc == 0.0, answer  # never correct
        assert seconds < 1.5 + 30, (answer, seconds)  # its time, plus a child's start-up on a loaded machine
    assert out["timeouts"] == sum(late for _, late, _ in out["results"]) >= 2, out
    assert out["after"] == 1.0


def test_the_time_bound_is_a_reward_kwarg_the_config_check_accepts():
    import inspect

    from recipe.retool.reward import compute_score
    from recipe.retool.train import compose

    cfg = compose("retool_grpo_template")
    kwargs = cfg.reward.custom_reward_function.reward_kwargs
    assert float(kwargs.verify_timeout) > 0
    assert "verify_timeout" in inspect.signature(compute_score).parameters
