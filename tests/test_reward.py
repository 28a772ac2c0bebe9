"""recipe.retool.reward: answer extraction and equivalence on a broad answer set."""

from __future__ import annotations

import threading

import pytest

from recipe.retool.reward import compute_score, extract_answer, is_equivalent, score_answer

TOOL_TURN = ("<tool_call>\n{\"name\": \"code_interpreter\", \"arguments\": {\"code\": \"print(42)\"}}\n</tool_call>"
             "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
    ("\\boxed{x^{2}+\\sqrt{\\frac{1}{2}}}", "x^{2}+\\sqrt{\\frac{1}{2}}"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),
    ("no box here, Answer: 5", None),
    ("\\fbox{7}", "7"),
    ("unclosed \\boxed{12", None),
    ("The answer is shown in code: ```python\nprint('\\\\boxed{9}')\n```", None),
    ("<code>print(r'\\boxed{9}')</code> then \\boxed{10}", "10"),
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
    # ReTool-SFT tags count as tool output too
    assert extract_answer("<interpreter>\\boxed{3}</interpreter> so") is None


@pytest.mark.parametrize("pred, truth, ok", [
    ("42", "42", True), ("042", "42", True), ("42.0", "42", True), ("1,000", "1000", True),
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac{1}{2}", "\\frac{1}{2}", True), ("\\tfrac12", "1/2", True),
    ("30^\\circ", "30", True), ("12 \\text{ cm}", "12", True), ("\\$5", "5", True), ("50\\%", "50", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("x^2+2x+1", "(x+1)^2", True),
    ("41", "42", False), ("\\frac{1}{3}", "0.33", False), ("", "1", False), ("abc", "42", False),
])
def test_equivalence(pred, truth, ok):
    assert is_equivalent(pred, truth) is ok


def test_compute_score_values_and_shaping():
    right = "work " + TOOL_TURN + "\\boxed{42}"
    wrong0 = "\\boxed{41}"
    wrong3 = ("x " + TOOL_TURN) * 3 + "\\boxed{41}"
    wrong9 = ("x " + TOOL_TURN) * 9 + "\\boxed{41}"
    r = compute_score(data_source="aime24", solution_str=right, ground_truth="42", extra_info={})
    assert r == {"score": 1.0, "acc": 1.0, "pred": "42", "num_tool_calls": 1}
    assert compute_score(solution_str=wrong0, ground_truth="42")["score"] == -1.0
    assert compute_score(solution_str=wrong3, ground_truth="42")["score"] == pytest.approx(-0.7)
    assert compute_score(solution_str=wrong9, ground_truth="42")["score"] == pytest.approx(-0.6)  # capped
    assert compute_score(solution_str=wrong9, ground_truth="42", tool_bonus=0)["score"] == -1.0
    assert compute_score(solution_str="no answer", ground_truth="42") == {
        "score": -1.0, "acc": 0.0, "pred": "", "num_tool_calls": 0}


def test_symbolic_check_works_outside_the_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", score_answer("\\boxed{2\\sqrt{2}}", "\\sqrt{8}")))
    t.start()
    t.join(30)
    assert out["r"] == (True, "2\\sqrt{2}")


def test_tool_calls_survive_verls_decoding_and_earn_the_bonus(dev_tokenizer):
    """verl decodes the response with skip_special_tokens=True before scoring: the tool tags must
    not be special tokens (as in Qwen2.5's tokenizer), or no tool call would ever be counted."""
    text = ('<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\nno idea<|im_end|>")
    decoded = dev_tokenizer.decode(dev_tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True)
    result = compute_score(data_source="dapo", solution_str=decoded, ground_truth="7")
    assert result["num_tool_calls"] == 1 and result["score"] == pytest.approx(-0.9)
