"""A reward for the resume tests (``reward_funcs=[resume_rewards.low_digit_reward]``).

About one completion in six starts with 0-6, so about half the groups of 4 have unequal rewards:
GPG's threshold then often draws an extra round with more valid groups than fit, and the rest go
to the carry buffer, which a resume must restore.
"""


def low_digit_reward(completions, **kwargs):
    return [float(str(c)[:1] in "0123456") for c in completions]
