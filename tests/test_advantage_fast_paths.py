"""The vectorised advantage paths (grouprl_core group statistics, the verl uid mapping and broadcast)
give exactly the numbers of a naive per-group loop, on verl-shaped inputs: shuffled uuid strings
(verl's balance_batch reorders the batch), gaps in group ids, and verl's int64 response mask."""

import math
import random
import uuid

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import get_adv_estimator_fn

from grouprl_core.groups import group_stats
from grouprl_core.grpo import grpo_advantages
from grouprl_verl.estimators import group_ids_from_index


def naive_group_stats(values: list[float], ids: list[int]):
    """Per-sample (mean, unbiased std, zero-variance) with float64 sums in sample order."""
    members: dict[int, list[float]] = {}
    for v, g in zip(values, ids):
        members.setdefault(g, []).append(v)
    out = []
    for g in ids:
        m = members[g]
        total = 0.0
        for v in m:
            total += v
        mean = total / len(m)
        ss = 0.0
        for v in m:
            ss += (v - mean) * (v - mean)
        std = math.sqrt(ss / (len(m) - 1)) if len(m) > 1 else 0.0
        out.append((mean, std, max(m) - min(m) <= 1e-6))
    return out


def shuffled_uids(num_prompts: int, group_size: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    uids = np.array([str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(num_prompts)], dtype=object)
    return uids.repeat(group_size)[np.random.default_rng(seed).permutation(num_prompts * group_size)]


def test_group_stats_and_grpo_equal_a_naive_loop_exactly():
    rng = random.Random(3)
    ids = [3 * rng.randrange(40) for _ in range(500)]  # gaps: only multiples of 3 are used
    ids[:5] = [0, 0, 3, 6, 300]  # 300: a singleton group (std 0, zero-variance)
    values = [rng.choice([0.0, 0.25, 1.0, 0.1]) for _ in ids]
    vals = torch.tensor(values, dtype=torch.float32)
    stats = group_stats(vals, torch.tensor(ids))
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in values]  # the values as float32 holds them
    expected = naive_group_stats(f32, ids)
    assert torch.equal(stats.mean, torch.tensor([e[0] for e in expected], dtype=torch.float32))
    assert torch.equal(stats.std, torch.tensor([e[1] for e in expected], dtype=torch.float32))
    assert stats.zero_variance.tolist() == [e[2] for e in expected]

    adv = grpo_advantages(vals, torch.tensor(ids), scale="group", eps=1e-6)
    naive = []
    for r, (mean, std, zero) in zip(vals, expected):
        a = (r - torch.tensor(mean, dtype=torch.float32)) / (torch.tensor(std, dtype=torch.float32) + 1e-6)
        naive.append(0.0 if zero else float(a))
    assert torch.equal(adv, torch.tensor(naive, dtype=torch.float32))


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32])
def test_verl_gpg_estimator_on_shuffled_uuids_and_int_mask(mask_dtype):
    group_size, prompts, length = 4, 30, 6
    uids = shuffled_uids(prompts, group_size, seed=1)
    b = len(uids)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).to(mask_dtype)
    scores = (torch.rand(b, generator=g) < 0.5).float()
    token_rewards = torch.zeros(b, length)
    token_rewards[torch.arange(b), lengths - 1] = scores

    adv, returns = get_adv_estimator_fn("grouprl_gpg")(token_level_rewards=token_rewards, response_mask=mask,
                                                         index=uids, config=None)

    # naive: groups by uid string, alpha = B / (B - M), A = alpha (r - mean_g) on response tokens
    by_uid: dict[str, list[float]] = {}
    for u, s in zip(uids, scores.tolist()):
        by_uid.setdefault(u, []).append(s)
    zero = [max(by_uid[u]) == min(by_uid[u]) for u in uids]
    alpha = b / (b - sum(zero))
    assert 0 < sum(zero) < b  # the case exercises both kinds of group
    for i, u in enumerate(uids):
        mean = sum(by_uid[u]) / len(by_uid[u])
        a = 0.0 if zero[i] else alpha * (scores[i].item() - mean)
        row = [a if t < lengths[i] else 0.0 for t in range(length)]
        assert adv[i].tolist() == pytest.approx(row, rel=1e-6, abs=1e-7)
    assert adv.dtype == torch.float32 and adv.shape == (b, length)
    assert returns is adv


def test_uid_groups_by_value_whether_or_not_samples_share_the_string_object():
    uids = shuffled_uids(50, 4, seed=3)  # verl's layout: each prompt's str object repeated (np.repeat)
    copies = np.array(["".join(list(u)) for u in uids], dtype=object)  # equal strings, distinct objects
    assert uids[0] is not copies[0] and uids[0] == copies[0]
    mixed = np.where(np.arange(len(uids)) % 2 == 0, uids, copies)  # both kinds within one group
    naive: dict[str, int] = {}
    expected = [naive.setdefault(u, len(naive)) for u in uids]
    for index in (uids, copies, mixed, list(uids)):
        ids = group_ids_from_index(index, len(uids), "test").tolist()
        # the same partition as the naive string dict: a one-to-one relabelling
        assert len(set(ids)) == len(naive) and len(set(zip(ids, expected))) == len(naive)


def test_missing_uid_is_a_clear_error():
    uids = shuffled_uids(4, 2, seed=2)
    uids[5] = None
    with pytest.raises(ValueError, match=r"uid is missing .* index\(es\) \[5\]"):
        get_adv_estimator_fn("grouprl_gcpo")(token_level_rewards=torch.zeros(8, 3), response_mask=torch.ones(8, 3),
                                             index=uids, config=None)
