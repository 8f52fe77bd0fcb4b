"""GPG's batch planner in grouprl_core: the two threshold counts, the official cumulative alpha, the size
of an extra round for each resample strategy, and filling from partial rounds, against hand-derived values."""

from __future__ import annotations

import pytest
import torch

from grouprl_core.gpg import (
    cumulative_alpha,
    gpg_advantages,
    gpg_needs_more,
    gpg_round_groups,
    gpg_valid_count,
    groups_to_reach,
    plan_gpg_batch,
)


# ----------------------------------------------------------------------------- counts
def test_capped_and_global_counts_by_hand():
    # p0 holds 4 valid groups but has room for 2; p1 holds 0: the research note's scenario A after 2 rounds
    assert gpg_valid_count([4, 0], 2, "capped") == 2
    assert gpg_valid_count([4, 0], 2, "global") == 4
    # scenario B after round 2: p0 3 valid (room 2), p1 1
    assert gpg_valid_count([3, 1], 2, "capped") == 3
    assert gpg_valid_count([3, 1], 2, "global") == 4
    with pytest.raises(ValueError, match="valid_count"):
        gpg_valid_count([1], 1, "official")


def test_global_count_stops_where_the_capped_one_keeps_going():
    n_total, threshold = 4, 0.6
    # scenario A: every round adds 2 valid groups on p0 only
    capped = [gpg_valid_count([2 * r, 0], 2, "capped") / n_total for r in (1, 2, 3)]
    global_ = [gpg_valid_count([2 * r, 0], 2, "global") / n_total for r in (1, 2, 3)]
    assert [gpg_needs_more(f, threshold=threshold, extra_rounds=0, max_rounds=20) for f in capped] == [True] * 3
    assert [gpg_needs_more(f, threshold=threshold, extra_rounds=0, max_rounds=20) for f in global_] == [True, False, False]


def test_official_cumulative_alpha():
    # 1 / min(1, V / N)
    assert cumulative_alpha(4, 4) == 1.0
    assert cumulative_alpha(6, 4) == 1.0  # more valid groups than a round: alpha 1
    assert cumulative_alpha(3, 4) == pytest.approx(4 / 3)
    assert cumulative_alpha(1, 8) == pytest.approx(8.0)
    assert cumulative_alpha(0, 4) == 0.0  # nothing to learn (the official code divides by 0)
    # without resampling it is B / (B - M): 3 valid groups of 4, G = 2
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 1])
    assert gpg_advantages(rewards, torch.arange(8) // 2).alpha == pytest.approx(cumulative_alpha(3, 4))


def test_alpha_override_scales_the_advantages():
    rewards = torch.tensor([1.0, 0, 0, 0])  # group 0 valid, group 1 zero-variance; B / (B - M) = 2
    base = gpg_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    official = gpg_advantages(rewards, torch.tensor([0, 0, 1, 1]), alpha=1.0)
    assert base.advantages.tolist() == pytest.approx([1.0, -1.0, 0.0, 0.0])
    assert official.advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert official.alpha == 1.0
    # an all-zero-variance batch still skips, whatever alpha was asked for
    skip = gpg_advantages(torch.zeros(4), torch.tensor([0, 0, 1, 1]), alpha=1.0)
    assert skip.skip_update and skip.alpha == 0.0


# ----------------------------------------------------------------------------- round sizes
def test_groups_to_reach_matches_the_stop_test():
    for n in range(1, 30):
        for threshold in (0.0, 0.3, 0.5, 0.6, 0.75, 1.0):
            c = groups_to_reach(threshold, n)
            assert c / n >= threshold and (c == 0 or (c - 1) / n < threshold), (n, threshold)


@pytest.mark.parametrize(
    "strategy,valid,rate,procs,expected",
    [
        ("full_rounds", 1, 0.25, 1, 8),  # always a whole round per process
        ("full_rounds", 1, 0.25, 2, 4),
        # N = 8, beta_th 0.6 -> 5 needed; 1 held -> 4 missing
        ("missing_only", 1, 0.25, 1, 4),
        ("missing_only", 1, 0.25, 2, 2),  # ceil(4 / 2)
        ("missing_only", 4, 0.25, 2, 1),  # 1 missing -> still one group per process
        ("expected", 1, 0.5, 1, 8),  # ceil(4 / 0.5) = 8 = n
        ("expected", 3, 0.5, 1, 4),  # 2 missing / 0.5
        ("expected", 3, 0.5, 2, 2),  # 2 missing / (0.5 * 2)
        ("expected", 3, 0.1, 1, 8),  # capped at a whole round
        ("expected", 3, None, 1, 8),  # no rate yet: a whole round
        ("expected", 3, 0.0, 1, 8),
    ],
)
def test_round_sizes_by_hand(strategy, valid, rate, procs, expected):
    assert gpg_round_groups(strategy, valid_groups=valid, groups_per_round=8, threshold=0.6, num_processes=procs,
                            valid_rate=rate) == expected


def test_round_size_rejects_unknown_strategy_and_uneven_split():
    with pytest.raises(ValueError, match="resample_strategy"):
        gpg_round_groups("half", valid_groups=0, groups_per_round=4, threshold=0.5, num_processes=1)
    with pytest.raises(ValueError, match="multiple of num_processes"):
        gpg_round_groups("full_rounds", valid_groups=0, groups_per_round=5, threshold=0.5, num_processes=2)


# ----------------------------------------------------------------------------- filling from partial rounds
def test_partial_rounds_fill_with_the_newest_zero_variance_groups():
    # round 0: 4 groups, 1 valid; round 1: 2 groups, 1 valid; round 2: 1 group, valid
    plan = plan_gpg_batch([[True, False, False, False], [False, True], [True]], 4)
    # valid oldest first, then zero-variance newest round first: round 1's group 0, then round 0's
    assert plan.chosen == [(0, 0), (1, 1), (2, 0), (1, 0)]
    assert plan.carry == []


def test_full_rounds_still_fill_from_the_last_round_only():
    # the official rule: with whole rounds the last round always has enough fillers
    plan = plan_gpg_batch([[True, False, False, False], [False, True, False, False]], 4)
    assert plan.chosen == [(0, 0), (1, 1), (1, 0), (1, 2)]

