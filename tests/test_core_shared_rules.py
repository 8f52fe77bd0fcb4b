"""Rules both backends share, in grouprl_core: the GPG batch planner, gold rendering, COPO's answer keys,
the k3 KL and the shared defaults, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from grouprl_core import names
from grouprl_core.copo import MISSING_ANSWER_PREFIX, answer_keys, normalise_answer
from grouprl_core.gold import DEFAULT_GOLD_TEMPLATE, check_gold_template, render_gold
from grouprl_core.gpg import gpg_needs_more, group_valid_flags, plan_gpg_batch, usable_valid_groups
from grouprl_core.grpo import GRPO_STD_EPS, grpo_advantages
from grouprl_core.losses import k3_kl


# ----------------------------------------------------------------------------- GPG planner
def test_group_valid_flags_by_group_id():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert group_valid_flags(rewards, torch.tensor([0, 0, 1, 1, 2, 2])) == [False, True, False]
    # ids need not be contiguous rows
    assert group_valid_flags(rewards, torch.tensor([0, 1, 0, 1, 2, 2])) == [True, False, False]


def test_plan_keeps_valid_groups_oldest_first_and_carries_the_rest():
    # round 0: only group 0 valid; round 1: all four valid; a batch holds 4 groups
    plan = plan_gpg_batch([[True, False, False, False], [True, True, True, True]], 4)
    assert plan.chosen == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert plan.carry == [(1, 3)]
    assert plan.num_valid == 5 and plan.num_carried_used == 0
    assert plan.groups_of(plan.chosen, 1) == [0, 1, 2]


def test_plan_fills_with_the_last_rounds_zero_variance_groups():
    plan = plan_gpg_batch([[True], [False, True, False, False]], 4, carried_round=True)
    # the carried group first, then round 1's valid group, then round 1's other groups in order
    assert plan.chosen == [(0, 0), (1, 1), (1, 0), (1, 2)]
    assert plan.carry == [] and plan.num_carried_used == 1


def test_plan_bounds_the_carry_to_one_batch_and_can_drop_it():
    rounds = [[True] * 4, [True] * 4, [True] * 4]
    assert len(plan_gpg_batch(rounds, 4).carry) == 4  # 8 left over, one batch kept
    assert plan_gpg_batch(rounds, 4, carry_over=False).carry == []


def test_plan_refuses_a_last_round_too_small_to_fill_the_batch():
    with pytest.raises(ValueError, match="at least one batch of groups"):
        plan_gpg_batch([[False, False]], 4)


def test_threshold_decision():
    assert usable_valid_groups([[True, False], [True, True, True]], 3) == 3  # capped at the batch
    assert usable_valid_groups([[False, False]], 2) == 0
    assert gpg_needs_more(0.5, threshold=0.6, extra_rounds=0, max_rounds=20)
    assert not gpg_needs_more(0.6, threshold=0.6, extra_rounds=0, max_rounds=20)
    assert not gpg_needs_more(0.0, threshold=0.6, extra_rounds=20, max_rounds=20)  # the bound stops it
    assert not gpg_needs_more(0.0, threshold=0.0, extra_rounds=0, max_rounds=20)  # beta_th = 0: never


# ----------------------------------------------------------------------------- gold
def test_gold_rendering_and_the_empty_reference_rule():
    assert render_gold(DEFAULT_GOLD_TEMPLATE, "42") == "<think>\n42\n</think>\n\\boxed{42}"
    assert render_gold("{solution}", 7) == "7"
    for empty in (None, "", "   ", "\n\t"):
        assert render_gold("{solution}", empty) is None
    with pytest.raises(TypeError, match="reference"):
        render_gold("{solution}", ["a"])


@pytest.mark.parametrize("template", ["no placeholder", "{solution} {other}", "\\boxed{{solution}}"])
def test_bad_gold_templates_name_the_field(template):
    with pytest.raises(ValueError, match="algorithm.grouprl.gcpo.gold_template"):
        check_gold_template(template, "algorithm.grouprl.gcpo.gold_template")


# ----------------------------------------------------------------------------- COPO answers
def test_answer_keys_fall_back_to_the_reward_value():
    assert normalise_answer("  ") is None and normalise_answer(3) == "3"
    keys = answer_keys(["7", None, " ", "7", None], [1.0, 0.0, 0.0, 1.0, 1.0])
    assert keys[0] == keys[3] == "7"
    assert keys[1] == keys[2] == f"{MISSING_ANSWER_PREFIX}0"  # no answer: equal exactly when rewards are equal
    assert keys[4] == f"{MISSING_ANSWER_PREFIX}1" and keys[4] != keys[1]
    with pytest.raises(ValueError, match="2 answers for 1 rewards"):
        answer_keys(["a", "b"], [1.0])


# ----------------------------------------------------------------------------- KL, eps, names
def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, 0.0])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert k3_kl(logp, ref).tolist() == pytest.approx(expected)
    assert k3_kl(logp, ref)[1] == 0 and (k3_kl(logp, ref) >= 0).all()


def test_grpo_default_eps_is_trls():
    assert GRPO_STD_EPS == 1e-4
    adv = grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert adv.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)])


def test_metric_names_use_the_trl_spelling():
    assert names.COPO_GLOBAL_ADV_STD == "copo/global_adv_std"
    assert names.GOLD_TRUNCATED_FRAC == "gold/truncated_frac"
    values = [v for k, v in vars(names).items() if k.isupper()]
    assert len(values) == len(set(values)) and all("/" in v for v in values)
