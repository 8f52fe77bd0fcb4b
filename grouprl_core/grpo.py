"""GRPO's group-normalised advantage (Shao et al., DeepSeekMath, arXiv 2402.03300), shared by
GCPO-gold, COPO (its "local" advantage) and GCPO-guidance (its per-sequence advantage).

    A_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps)      (scale = "group")
    A_i = (r_i - mean_{g(i)} r) / (std_B r + eps)           (scale = "batch")
    A_i =  r_i - mean_{g(i)} r                              (scale = "none", Dr. GRPO)

std is unbiased; zero-variance groups get exactly 0.
"""

from __future__ import annotations

import torch

from .gpg import _batch_std
from .groups import group_stats

SCALE_MODES = ("group", "batch", "none")


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
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
