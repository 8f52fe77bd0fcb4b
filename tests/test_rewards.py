"""Rewards: answer extraction, math-verify accuracy, open-rs format/cosine rewards, verl compute_score."""

import math
import signal
import threading

import pytest

from grouprl.rewards import (
    _timeout_seconds,
    accuracy_reward,
    compute_score,
    cosine_reward,
    extract_final_answer,
    format_reward,
    think_answer_format_reward,
    make_cosine_reward,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{3} then \\boxed{4}", "4"),  # the last box counts
        ("<think>\n\\boxed{9}\n</think>\n<answer> \\boxed{10} </answer>", "10"),  # the last box
        ("<think>x</think><answer> 42 </answer>", "42"),
        ("Step 1 ...\nAnswer: $34$", "34"),
        ("\\boxed 5 is it", None),  # open-r1 (math-verify) reads a box with braces only
        ("The answer is 42.", None),  # no recognised format
        ("truncated \\boxed{\\frac{1}{2", None),  # box never closed
        ("<answer></answer>", None),
        ([{"role": "assistant", "content": "\\boxed{7}"}], "7"),  # conversational completion
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_accuracy_reward_strings_and_conversational():
    completions = [
        "\\boxed{0.5}",  # equal to 1/2 numerically
        "<answer>\\frac{1}{2}</answer>",
        "\\boxed{\\frac{1}{3}}",  # wrong
        "the answer is 1/2",  # right value, no format: wrong
        "\\boxed{(1,2)}",
        "\\boxed{27}",
    ]
    solutions = ["\\frac{1}{2}", "0.5", "\\frac{1}{2}", "\\frac{1}{2}", "(1, 2)", 27.0]
    assert accuracy_reward(completions, solutions) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert accuracy_reward(conversational, solutions) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_accuracy_reward_full_solution_as_reference():
    # A worked solution as reference: its last box is the answer.
    ref = "Adding gives $3x = 9$, so $x = \\boxed{3}$."
    assert accuracy_reward(["\\boxed{3}", "\\boxed{9}"], [ref, ref]) == [1.0, 0.0]


def test_accuracy_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        accuracy_reward(["\\boxed{1}"], ["1", "2"])


def test_format_reward_counts_one_think_closer():
    completions = [
        "reasoning\n</think>\nthe answer",  # exactly one "\n</think>\n"
        "reasoning</think> answer",  # no newlines around the tag
        "a\n</think>\nb\n</think>\n",  # two
        [{"role": "assistant", "content": "r\n</think>\n\\boxed{1}"}],
    ]
    assert format_reward(completions) == [1.0, 0.0, 0.0, 1.0]


def test_think_answer_format_reward_is_the_open_r1_regex_not_the_open_rs_count():
    """Cases decided by hand from the open-r1 rule: the completion starts with "<think>\n", the think block
    closes with "\n</think>\n", an answer block "<answer>\n...\n</answer>" follows and ends a line."""
    cases = [
        ("<think>\nx = 2\n</think>\n<answer>\n2\n</answer>", 1.0),
        ("<think>\na\nb\n</think>\n<answer>\n2\n</answer>\ntrailing line", 1.0),  # "$" matches a line end
        ("<think>\nx\n</think>\n<answer>\n2\n</answer> trailing", 0.0),  # "</answer>" not at a line end
        ("reasoning\n</think>\nthe answer", 0.0),  # open-rs format: 1.0, open-r1 format: 0.0
        (" <think>\nx\n</think>\n<answer>\n2\n</answer>", 0.0),  # must start the completion
        ("<think>x</think><answer>2</answer>", 0.0),  # the newlines are required
        ([{"role": "assistant", "content": "<think>\nx\n</think>\n<answer>\n1\n</answer>"}], 1.0),
    ]
    assert think_answer_format_reward([c for c, _ in cases]) == [r for _, r in cases]
    assert format_reward(["reasoning\n</think>\nthe answer"]) == [1.0]


def _padded(answer: str, length: int) -> str:
    box = f"\\boxed{{{answer}}}"
    return "x" * (length - len(box)) + box


def test_cosine_reward_by_hand():
    # open-rs defaults: max_len 1000 chars; correct 1.0 -> 0.5, wrong 0.0 -> -0.5.
    # L = 500: cos(pi/2) = 0, so correct = 0.5 + 0.5*0.5*1 = 0.75 and wrong = -0.5 + 0.5*0.5*1 = -0.25.
    # L = 1000: cos(pi) = -1: correct 0.5, wrong -0.5.
    # L = 2000: cos(2 pi) = 1 (open-rs does not clip): correct 1.0, wrong 0.0.
    completions = [_padded("7", 500), _padded("8", 500), _padded("7", 1000), _padded("8", 1000), _padded("7", 2000),
                   _padded("8", 2000)]
    got = cosine_reward(completions, ["7"] * 6)
    assert got == pytest.approx([0.75, -0.25, 0.5, -0.5, 1.0, 0.0], abs=1e-12)
    # L = 250: cos(pi/4) = sqrt(2)/2: correct = 0.5 + 0.25 (1 + sqrt(2)/2).
    assert cosine_reward([_padded("7", 250)], ["7"])[0] == pytest.approx(0.5 + 0.25 * (1 + math.sqrt(0.5)))


def test_cosine_reward_options():
    clipped = make_cosine_reward(max_len=100, clip_length=True)
    # L = 400 > max_len: clipped progress 1 -> cos(pi) = -1: the L_max values.
    assert clipped([_padded("7", 400), _padded("8", 400)], ["7", "7"]) == pytest.approx([0.5, -0.5])
    # An unparseable reference gives open-rs's 1.0.
    assert cosine_reward(["\\boxed{1}"], [""]) == [1.0]
    assert cosine_reward.__name__ == "cosine_reward"
    with pytest.raises(ValueError, match="max_len"):
        make_cosine_reward(max_len=0)


def test_compute_score_dict():
    assert compute_score("knoveleng/open-rs", "<think>\n..\n</think>\n\\boxed{\\frac{3}{4}}", "0.75") == {
        "score": 1.0, "acc": 1.0, "pred": "\\frac{3}{4}"}
    assert compute_score("math_dapo", "Answer: 12", "13", extra_info={"index": 0}) == {
        "score": 0.0, "acc": 0.0, "pred": "12"}
    assert compute_score("aime24", "no final answer", "5") == {"score": 0.0, "acc": 0.0, "pred": ""}
    # several accepted references: any one matches
    assert compute_score("x", "\\boxed{3}", ["2", "3"])["score"] == 1.0


def test_compute_score_off_the_main_thread():
    # verl 0.9.1's reward loop calls compute_score in executor threads, where math-verify's
    # signal-based timeout would raise ValueError; ours disables it there.
    results = []
    def score_in_thread():
        results.append((_timeout_seconds(), compute_score("s", "\\boxed{1/2}", "0.5")))

    worker = threading.Thread(target=score_in_thread)
    worker.start()
    worker.join()
    assert results == [(None, {"score": 1.0, "acc": 1.0, "pred": "1/2"})]


def test_timeout_leaves_an_armed_alarm_alone():
    assert _timeout_seconds() == 5
    old = signal.signal(signal.SIGALRM, lambda *a: None)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert _timeout_seconds() is None
        assert compute_score("s", "\\boxed{2}", "2")["score"] == 1.0
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # still armed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
