"""GRPO's group-normalised advantage (Shao et al., DeepSeekMath, arXiv 2402.03300), shared by
GCPO-gold, COPO (its "local" advantage) and GCPO-guidance (its per-sequence advantage).

    A_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps)      (scale = "group")
    A_i = (r_i - mean_{g(i)} r) / (std_B r + eps)           (scale = "batch")
    A_i =  r_i - mean_{g(i)} r                              (scale = "none", Dr. GRPO)

std is unbiased; zero-variance groups get exactly 0. ``eps`` defaults to
:data:`GRPO_STD_EPS` = 1e-4, the value TRL's ``GRPOTrainer`` adds in its own advantage (1.14-1.16),
so GCPO-gold and GCPO-guidance use the same number on both backends.
"""

from __future__ import annotations

import torch

from .gpg import _batch_std
from .groups import group_stats

SCALE_MODES = ("group", "batch", "none")
GRPO_STD_EPS = 1e-4  # TRL GRPOTrainer: (r - mean) / (std + 1e-4)


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = GRPO_STD_EPS,
    process_group=None,
) -> torch.Tensor:
    """(B,) group-normalised advantages; formula in the module docstring."""
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; every completion needs a finite reward")
    stats = group_stats(rewards, group_ids)
    adv = rewards - stats.mean
    if scale == "group":
        adv = adv / (stats.std + eps)
    elif scale == "batch":
        adv = adv / (_batch_std(rewards, process_group) + eps)
    return adv.masked_fill(stats.zero_variance, 0.0)
