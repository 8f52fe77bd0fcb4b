"""Reward-function fault handling shared by grouprl's TRL trainers.

TRL's ``GRPOTrainer._calculate_rewards`` (1.14.2-1.16) already names the function when it returns the
wrong number of rewards. It does not name a function that *raises*, and it lets NaN/inf
rewards through (``None`` becomes NaN and is skipped by ``nansum``; ``inf`` turns the group's
advantages into NaN, and the NaN reaches the weights). These helpers close both gaps.
"""

from __future__ import annotations

import traceback

import torch


def _code_of(func):
    """The code object a reward function runs (function, bound method, callable object, partial, module)."""
    for candidate in (func, getattr(func, "func", None), getattr(func, "forward", None),
                      getattr(func, "__call__", None)):
        code = getattr(candidate, "__code__", None)
        if code is not None:
            return code
    return None


def note_failing_reward_function(err: BaseException, reward_funcs, reward_func_names) -> None:
    """Add a note to ``err`` naming the reward function it was raised in (the exception type is kept).

    The function is found by walking the traceback for the frame of a reward function's code.
    """
    codes = {_code_of(f): name for f, name in zip(reward_funcs, reward_func_names, strict=True)}
    codes.pop(None, None)
    culprit = next((codes[frame.f_code] for frame, _ in traceback.walk_tb(err.__traceback__)
                    if frame.f_code in codes), None)
    if culprit is not None:
        err.add_note(f"grouprl: raised inside reward function {culprit!r}; fix that function (it must return one "
                     "finite float per completion).")
    else:
        err.add_note(f"grouprl: raised while computing rewards with {list(reward_func_names)}.")


def check_reward_matrix(rewards_per_func: torch.Tensor, reward_func_names, trainer_name: str) -> None:
    """Raise if a completion got no reward from any function (all NaN/None) or any reward is inf.

    ``rewards_per_func`` is TRL's ``(N, num_funcs)`` matrix, ``None`` already turned into NaN. A NaN
    in one column while another function scored the row is TRL's "function does not apply" and
    stays allowed.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    infinite = torch.isinf(rewards_per_func)
    if not (unscorable.any() or infinite.any()):
        return
    bad_funcs = [
        name for i, name in enumerate(reward_func_names)
        if torch.isinf(rewards_per_func[:, i]).any() or torch.isnan(rewards_per_func[unscorable, i]).any()
    ]
    raise ValueError(
        f"reward_funcs {bad_funcs} returned NaN/None/inf for {int((unscorable | infinite.any(1)).sum())} "
        f"completion(s). {trainer_name} needs a finite reward for every completion: return 0.0 for wrong or "
        "malformed answers instead of None/NaN/inf."
    )
