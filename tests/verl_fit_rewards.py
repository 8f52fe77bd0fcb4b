"""Reward functions of the verl fit tier (``reward.custom_reward_function.path``), one per algorithm.

verl's reward-loop worker loads this file by path and calls ``name(data_source, solution_str,
ground_truth, extra_info)`` through the configured reward manager. The scores are deterministic
functions of the response text (an md5 hash), so the tiny random model gets a chosen mix of correct
and wrong answers and the tests can recompute every score themselves.

The functions used with verl's default (naive) reward manager first check the two fields it adds to
``extra_info`` for every row it scores (``num_turns``, ``rollout_reward_scores``): a row scored by
hand, outside the reward manager, raises ``KeyError`` there. (verl's DAPO manager adds neither.)
"""

from __future__ import annotations

import hashlib


def unit(text: str) -> float:
    """A deterministic pseudo-random number in [0, 1) from ``text``."""
    return int(hashlib.md5(text.encode()).hexdigest()[:8], 16) / 2**32


def _check_reward_manager_fields(extra_info) -> None:
    for key in ("num_turns", "rollout_reward_scores"):
        if key not in (extra_info or {}):
            raise KeyError(f"extra_info has no {key!r}: this row was not scored through verl's reward manager")


def gpg_pred(solution_str: str, index: int) -> str:
    """The first character for dataset rows 0-11, the first word for later rows: string extras whose width
    differs between generation rounds (the unshuffled first batches hold rows 0-11)."""
    words = solution_str.strip().split(" ")
    return words[0][:1] if index < 12 else words[0]


def gpg_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Correct with probability 0.25 (hash of the text); ``pred`` from :func:`gpg_pred`."""
    _check_reward_manager_fields(extra_info)
    return {"score": float(unit(solution_str) < 0.25), "pred": gpg_pred(solution_str, int(extra_info["index"]))}


def gcpo_pred(solution_str: str) -> str:
    return solution_str.split("answer:")[-1].strip() if "answer:" in solution_str else ""


def gcpo_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Correct when the text after ``answer:`` is the ground truth (never for the random model); for DAPO."""
    pred = gcpo_pred(solution_str)
    return {"score": float(pred == str(ground_truth)), "acc": pred == str(ground_truth), "pred": pred}


def gcpo_float_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """``gcpo_score`` returned as a bare float (verl's reward managers then report it as ``acc``)."""
    _check_reward_manager_fields(extra_info)
    return gcpo_score(data_source, solution_str, ground_truth, extra_info)["score"]


def copo_pred(solution_str: str) -> str:
    return solution_str.strip()[:1]


def copo_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Correct with probability 0.4; ``pred``: the first character (COPO's answer consistency)."""
    _check_reward_manager_fields(extra_info)
    return {"score": float(unit(solution_str) < 0.4), "pred": copo_pred(solution_str)}


def guidance_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """Rows with ``extra_info.index < 4`` are never correct (their batch has no signal); others with p = 0.4."""
    _check_reward_manager_fields(extra_info)
    if int(extra_info["index"]) < 4:
        return 0.0
    return float(unit(solution_str) < 0.4)
