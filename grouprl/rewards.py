"""Rule-based maths rewards, usable as TRL reward functions and as a verl ``compute_score``.

Correctness is :mod:`grouprl_core.answers` in its training mode (``TRAIN``, open-r1 / open-rs's
``accuracy_reward``): math-verify parses the whole completion, a ``\\boxed{}`` first, then
``final answer is $x$`` and ``answer: $x$``; where it finds none of those, the last ``Answer: X``
line (DAPO-Math-17k's instruction) or ``<answer>X</answer>`` block (the open-rs prompt) is read.
The reference is parsed with math-verify (a bare answer as if boxed) and compared gold first;
words are compared as text. See that module for the sources and the one difference from open-r1.

Rewards:

* :func:`accuracy_reward` -- 1.0 if the final answer equals the reference, else 0.0.
* :func:`format_reward` -- the open-rs ``format`` reward: 1.0 iff the completion contains exactly
  one ``"\\n</think>\\n"`` (open-rs ``src/open_r1/rewards.py``; the ``<think>`` opener is in the
  prompt of R1-distill chat templates, so only the closer is counted).
* :func:`think_answer_format_reward` -- the open-r1 ``format`` reward of the GPG 7B configs (GPG's
  open-r1 fork, ``src/open_r1/rewards.py`` ``format_reward``): 1.0 iff the whole completion is
  ``<think>\n...\n</think>\n<answer>\n...\n</answer>`` (``re.match`` of
  ``^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$`` with DOTALL and MULTILINE, so the
  answer block must end at a line end). Not the same reward as :func:`format_reward`.
* :func:`cosine_reward` / :func:`make_cosine_reward` -- the open-rs ``cosine`` reward
  (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning", as copied into open-r1 and
  open-rs): ``r = lo + 0.5 (hi - lo) (1 + cos(pi * L / L_max))`` with ``L`` the completion length in
  **characters**; correct answers go from 1.0 (empty) to 0.5 (``L = L_max``), wrong ones from 0.0
  to -0.5. open-rs defaults: ``L_max = 1000`` (GPG-RS1's ``train.sh`` passes no
  ``--cosine_max_len``; open-rs Exp 3 passes 3584).
* :func:`compute_score` -- verl's custom reward entry point (``custom_reward_function.path`` =
  this file, ``name`` = ``compute_score``); returns ``{"score", "acc", "pred"}``, the same keys as
  verl's own ``math_dapo`` scorer, which verl's reward managers store as ``reward_extra_info``.
  ``pred`` is :func:`grouprl_core.answers.final_answer`, the string TRL's COPO groups by as well
  (its default ``answer_extractor``), so COPO sees the same answers on both backends.

Timeouts: math-verify bounds each parse/verify with ``signal.alarm``, which raises off the main
thread (verl 0.9.1's reward loop calls ``compute_score`` through ``run_in_executor``, i.e. in a
worker thread); :func:`grouprl_core.answers.timeout_seconds` enables it only on the main thread
and only when no other ``SIGALRM`` timer is running (verl's ``NaiveRewardManager`` may arm one for
``compute_score_timeout``, and math-verify's ``alarm(0)`` would cancel it).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["accuracy_reward", "completion_text", "compute_score", "cosine_reward", "format_reward", "is_correct",
           "last_boxed_content", "make_cosine_reward", "think_answer_format_reward"]


def _answers():
    """:mod:`grouprl_core.answers`, imported on first use: the grouprl_core package imports torch,
    which ``grouprl data`` (importing this module) does not need."""
    from grouprl_core import answers

    return answers


def completion_text(completion: Any) -> str:
    """The text of a completion (a string or TRL's conversational messages): :func:`grouprl_core.answers.completion_text`."""
    return _answers().completion_text(completion)


def extract_final_answer(completion: Any) -> str | None:
    """The final-answer string of a completion: :func:`grouprl_core.answers.final_answer` (its old name here)."""
    return _answers().final_answer(completion)


def _timeout_seconds() -> int | None:
    return _answers().timeout_seconds()


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    ``\\boxed 5`` (no braces) gives ``"5"``. Returns None when there is no complete box. Used to
    take the answer out of a worked reference solution (``grouprl data``), not to score completions.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # "\boxed 5": the argument runs to the next space or '$'
        arg = re.match(r"\s*([^\s$]+)", text[i:])
        return arg.group(1) if arg else None
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the box was cut off (e.g. a truncated completion)


def is_correct(completion: Any, gold: Any) -> bool:
    """The training-mode verdict for one completion against ``gold`` (a string, number or list of accepted ones)."""
    answers = _answers()
    return answers.score(completion, gold, answers.TRAIN)[0]


# ----------------------------------------------------------------------------- TRL reward functions
def accuracy_reward(completions: list, solution: list, **kwargs) -> list[float]:
    """TRL reward: 1.0 if the completion's final answer equals ``solution`` (math-verify), else 0.0.

    ``solution`` is the dataset column of that name (the prepared datasets hold the final answer
    there). A completion without an answer gets 0.0.
    """
    return [float(is_correct(c, s)) for c, s in zip(completions, solution, strict=True)]


def format_reward(completions: list, **kwargs) -> list[float]:
    """TRL reward (open-rs ``format``): 1.0 iff the completion contains exactly one ``"\\n</think>\\n"``."""
    return [1.0 if completion_text(c).count("\n</think>\n") == 1 else 0.0 for c in completions]


THINK_ANSWER_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)


def think_answer_format_reward(completions: list, **kwargs) -> list[float]:
    """TRL reward (open-r1 ``format``, the GPG 7B configs): 1.0 iff the completion matches
    :data:`THINK_ANSWER_FORMAT` from its first character (a think block, then an answer block)."""
    return [1.0 if THINK_ANSWER_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def make_cosine_reward(
    max_len: int = 1000,
    min_value_wrong: float = 0.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    clip_length: bool = False,
    unparseable_gold_reward: float = 1.0,
):
    """Build the open-rs cosine length-scaled correctness reward.

    For a completion of ``L`` characters, with ``c = cos(pi * L / max_len)``:
    correct: ``r = min_value_correct + 0.5 (max_value_correct - min_value_correct)(1 + c)``;
    wrong:   ``r = max_value_wrong + 0.5 (min_value_wrong - max_value_wrong)(1 + c)``
    (open-r1/open-rs swap min and max for wrong answers, so short wrong answers get
    ``min_value_wrong`` = 0.0 and long ones ``max_value_wrong`` = -0.5).

    Defaults are open-rs's (``cosine_max_len`` 1000 characters, values 0.0/-0.5/0.5/1.0). Like
    open-rs, ``L`` is not clipped, so past ``max_len`` the cosine turns back up (a completion of
    ``2 max_len`` characters scores like an empty one); ``clip_length=True`` clips ``L/max_len``
    at 1 instead (our option, not in the original). A reference math-verify cannot parse gives
    ``unparseable_gold_reward`` (1.0 in open-rs, which skips such rows that way). Correctness is
    :func:`is_correct`, the training mode of :mod:`grouprl_core.answers`.
    """
    if max_len <= 0:
        raise ValueError(f"cosine max_len must be positive, got {max_len}")

    def cosine_reward(completions: list, solution: list, **kwargs) -> list[float]:
        rewards = []
        for completion, gold in zip(completions, solution, strict=True):
            if not _answers().parse_gold(gold, _answers().TRAIN):
                rewards.append(float(unparseable_gold_reward))
                continue
            text = completion_text(completion)
            progress = len(text) / max_len
            if clip_length:
                progress = min(progress, 1.0)
            cosine = math.cos(progress * math.pi)
            if is_correct(text, gold):
                lo, hi = min_value_correct, max_value_correct
            else:
                lo, hi = max_value_wrong, min_value_wrong
            rewards.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
        return rewards

    cosine_reward.__name__ = "cosine_reward"  # TRL logs rewards/<__name__>
    return cosine_reward


#: The open-rs cosine reward with its defaults (max_len 1000 characters).
cosine_reward = make_cosine_reward()

#: Names the launcher and recipes use for ``reward_funcs``.
REWARD_FUNCS = {"accuracy": accuracy_reward, "format": format_reward, "cosine": cosine_reward,
                "think_answer_format": think_answer_format_reward}


# ----------------------------------------------------------------------------- verl
def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs):
    """verl custom reward: ``{"score": 1.0 or 0.0, "acc": same, "pred": extracted answer or ""}``.

    Same rule as :func:`accuracy_reward`, for every ``data_source``. verl 0.9.1's reward managers
    take ``score`` as the reward and keep every key as ``reward_extra_info``; ``pred`` is
    :func:`grouprl_core.answers.final_answer` ("" rather than None so those lists stay plain
    strings), which verl's COPO reads through ``algorithm.grouprl.copo.answer_key: pred``.
    """
    answers = _answers()
    extraction = answers.extract(solution_str, answers.TRAIN)
    acc = float(answers.matches(ground_truth, extraction, answers.TRAIN))
    return {"score": acc, "acc": acc, "pred": extraction.answer or ""}
