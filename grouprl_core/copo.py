"""COPO: Consistency-Aware Policy Optimization (Han et al., arXiv 2508.04138; official code
hijih/copo-code, ``core_algos.py`` at f66883f). Formulas follow the official code.

For prompt q with G completions, rewards r_i and extracted final answers a_i:

    consistency entropy  H_q = -sum_{a in answers(q)} p(a) log2 p(a),  p(a) = count(a) / G
    local advantage      A^loc_i  = (r_i - mean_q r) / (std_q r + eps)                (GRPO)
    prompt reward        R_q = mean_i r_i * c_q,  c_q = 1 - lambda H_q if enabled else 1,
                         lambda = (1 - 1/G) / log2 G
    global advantage     A^glob_q = (R_q - mean_{q' in batch} R) / (std_{q' in batch} R + eps)
                         over all prompts of the (global) generation batch, broadcast to q's samples
    gate                 w_q = sigmoid(k (H_q - b))     (weight of the local loss)
    loss per token       l = w~_i * L^loc_i + (1 - w~_i) * L^glob_i, both dual-clip PPO on one ratio
    blend w~_i:          only-soft: w_q;  soft-with-zero: w_q * 1[r_i != 0];
                         soft-with-forced: w_q * 1[A^loc_i != 0];  only-global: 0;  no-global: 1

Entropy uses base 2 (k and b were tuned for it). std is unbiased. Aggregation:
``seq-mean-token-mean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .distributed import all_reduce_sum
from .grpo import grpo_advantages
from .losses import clipped_surrogate_loss

BLEND_MODES = ("only-soft", "soft-with-zero", "soft-with-forced", "only-global", "no-global")
COPO_STD_EPS = 1e-6  # official code: (r - mean) / (std + 1e-6), local and global
DEFAULT_GATE_K, DEFAULT_GATE_B = 5.0, 1.0  # official 7B script
DEFAULT_BLEND = "only-soft"
DEFAULT_DUAL_CLIP = 3.0
# prefix of the stand-in answer of a completion without an extracted answer; "\x00" keeps it
# apart from every answer string an extractor can return
MISSING_ANSWER_PREFIX = "\x00reward="


def normalise_answer(answer) -> str | None:
    """An extracted answer as a string, or None when nothing was extracted (None or blank)."""
    if answer is None or not str(answer).strip():
        return None
    return str(answer)


def answer_keys(answers: list, rewards: list[float]) -> list[str]:
    """The strings the consistency entropy compares, one per completion.

    An extracted answer is compared as its raw string (as the official code); a completion with no
    answer (None or blank) stands in with its reward value, ``MISSING_ANSWER_PREFIX + f"{r:.6g}"``
    (our rule, ``docs/algorithms.md`` COPO), so completions without answers count as equal exactly
    when their rewards are.
    """
    if len(answers) != len(rewards):
        raise ValueError(f"{len(answers)} answers for {len(rewards)} rewards")
    keys = []
    for answer, reward in zip(answers, rewards):
        answer = normalise_answer(answer)
        keys.append(f"{MISSING_ANSWER_PREFIX}{float(reward):.6g}" if answer is None else answer)
    return keys


@dataclass
class COPOAdvantages:
    local: torch.Tensor  # (B,) GRPO advantage
    global_: torch.Tensor  # (B,) the prompt's global advantage, per sample
    entropy: torch.Tensor  # (B,) H_q of the sample's prompt (bits)
    gate: torch.Tensor  # (B,) w_q = sigmoid(k (H_q - b))
    prompt_reward: torch.Tensor  # (B,) R_q
    global_std: float  # std of R over the batch's prompts


def consistency_entropy(answer_ids: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) Shannon entropy in bits of the answer distribution of each sample's group.

    ``answer_ids`` are integer codes of the extracted answer strings (equal strings, equal codes).
    """
    gid = group_ids.long()
    aid = answer_ids.long()
    if aid.min() < 0:
        raise ValueError("answer_ids must be non-negative integer codes")
    num_groups = int(gid.max()) + 1
    key = gid * (int(aid.max()) + 1) + aid  # one key per (group, answer) pair
    uniq, pair_count = torch.unique(key, return_counts=True)
    pair_group = uniq // (int(aid.max()) + 1)
    group_size = torch.zeros(num_groups, dtype=torch.float64, device=gid.device).index_add_(
        0, gid, torch.ones_like(gid, dtype=torch.float64)
    )
    p = pair_count.to(torch.float64) / group_size[pair_group]
    h = torch.zeros(num_groups, dtype=torch.float64, device=gid.device).index_add_(0, pair_group, -p * torch.log2(p))
    return h[gid].to(torch.float32)


def encode_answers(answers: list[str]) -> torch.Tensor:
    """Integer codes for answer strings (raw string equality, as the official code)."""
    codes: dict[str, int] = {}
    return torch.tensor([codes.setdefault(a, len(codes)) for a in answers], dtype=torch.long)


def copo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    answer_ids: torch.Tensor,
    *,
    gate_k: float = DEFAULT_GATE_K,
    gate_b: float = DEFAULT_GATE_B,
    eps: float = COPO_STD_EPS,
    entropy_reward_coef: bool = False,
    local_scale: str = "group",
    process_group=None,
) -> COPOAdvantages:
    """Local, global, entropy and gate per sample; formulas in the module docstring.

    ``entropy_reward_coef`` switches on ``c_q = 1 - lambda H_q`` (the official ``reward_coef_flg``;
    off in every official script). ``local_scale`` is GRPO's scale of the local advantage:
    ``"group"`` (the official default), ``"none"`` (official ``norm_adv_by_std_in_grpo=False``)
    or ``"batch"``. With ``process_group`` each process holds whole groups and the global
    standardisation runs over the prompts of all processes.
    """
    gid = group_ids.long()
    local = grpo_advantages(rewards, gid, scale=local_scale, eps=eps, process_group=process_group)
    entropy = consistency_entropy(answer_ids, gid)
    num_groups = int(gid.max()) + 1
    ones = torch.ones_like(rewards, dtype=torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64, device=gid.device).index_add_(0, gid, ones)
    present = size > 0
    mean_r = torch.zeros(num_groups, dtype=torch.float64, device=gid.device).index_add_(
        0, gid, rewards.to(torch.float64)
    ) / size.clamp(min=1)
    prompt_reward = mean_r
    if entropy_reward_coef:
        g = size.clamp(min=2)
        lam = (1 - 1 / g) / torch.log2(g)
        h_group = torch.zeros(num_groups, dtype=torch.float64, device=gid.device).index_add_(
            0, gid, entropy.to(torch.float64)
        ) / size.clamp(min=1)
        prompt_reward = mean_r * (1 - lam * h_group)
    r = prompt_reward[present]
    stats = all_reduce_sum(torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()]), process_group)
    n, s, ss = stats[0], stats[1], stats[2]
    batch_mean = s / n
    batch_std = ((ss - s * s / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
    global_adv = (prompt_reward - batch_mean) / (batch_std + eps)
    gate = torch.sigmoid(gate_k * (entropy - gate_b))
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return COPOAdvantages(
        local=local.to(dtype),
        global_=global_adv[gid].to(dtype),
        entropy=entropy,
        gate=gate.to(dtype),
        prompt_reward=prompt_reward[gid].to(dtype),
        global_std=float(batch_std),
    )


def copo_blend_weight(gate: torch.Tensor, rewards: torch.Tensor, local: torch.Tensor, blend: str) -> torch.Tensor:
    """(B,) weight w~ of the local loss for each sample (see the module docstring)."""
    if blend == "only-soft":
        return gate
    if blend == "soft-with-zero":
        return gate * (rewards != 0).to(gate.dtype)
    if blend == "soft-with-forced":
        return gate * (local != 0).to(gate.dtype)
    if blend == "only-global":
        return torch.zeros_like(gate)
    if blend == "no-global":
        return torch.ones_like(gate)
    raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")


def copo_token_loss(
    ratio: torch.Tensor,
    local: torch.Tensor,
    global_: torch.Tensor,
    blend_weight: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> torch.Tensor:
    """(B, T) per-token loss ``w~ L^loc + (1 - w~) L^glob``, both dual-clip PPO on ``ratio``."""
    loss_local = clipped_surrogate_loss(ratio, local, clip_low, clip_high, dual_clip)
    loss_global = clipped_surrogate_loss(ratio, global_, clip_low, clip_high, dual_clip)
    w = blend_weight.unsqueeze(-1)
    return w * loss_local + (1 - w) * loss_global


def entropy_normaliser(group_size: int) -> float:
    """lambda = (1 - 1/G) / log2 G: makes c_q = 1/G at maximal entropy (official reward_coef_flg)."""
    return (1 - 1 / group_size) / math.log2(group_size)
