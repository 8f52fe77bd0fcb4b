"""Group statistics on flat tensors.

Every algorithm in grouprl works on a flat batch of B samples, each tagged with the id of
the prompt (group) it answers. These helpers compute per-group statistics with scatter
operations (no Python loop over samples) and broadcast them back to the samples.

Conventions (shared by TRL, verl and the official codes of the papers):
- the group standard deviation is the *unbiased* one (divide by n - 1);
- a group of one sample has std 0 and is zero-variance;
- a group is *zero-variance* when ``max(r) - min(r) <= tol`` (tol = 1e-6), i.e. all its
  rewards are equal. Its advantages are 0 in every algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_VARIANCE_TOL = 1e-6


def contiguous_group_ids(batch_size: int, group_size: int, device=None) -> torch.Tensor:
    """Group ids ``[0]*G + [1]*G + ...`` for a batch whose groups are stored contiguously.

    This is TRL's layout (each prompt repeated ``num_generations`` times in a row).
    """
    if group_size < 1 or batch_size % group_size != 0:
        raise ValueError(f"batch_size={batch_size} is not a multiple of group_size={group_size}")
    return torch.arange(batch_size, device=device) // group_size


def _check(values: torch.Tensor, group_ids: torch.Tensor) -> int:
    if values.dim() != 1 or group_ids.dim() != 1 or values.numel() != group_ids.numel():
        raise ValueError(
            f"values and group_ids must be 1-D of equal length, got {tuple(values.shape)} and {tuple(group_ids.shape)}"
        )
    if values.numel() == 0:
        raise ValueError("empty batch: no samples to compute group statistics on")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    lowest, highest = torch.aminmax(group_ids)  # one pass, one device sync
    if lowest < 0:
        raise ValueError("group_ids must be non-negative")
    return int(highest) + 1


@dataclass
class GroupStats:
    """Per-sample broadcast of per-group statistics."""

    mean: torch.Tensor  # (B,) mean of the sample's group
    std: torch.Tensor  # (B,) unbiased std of the sample's group (0 for singleton groups)
    count: torch.Tensor  # (B,) size of the sample's group
    zero_variance: torch.Tensor  # (B,) bool: the sample's group has all-equal values


def group_stats(values: torch.Tensor, group_ids: torch.Tensor, tol: float = ZERO_VARIANCE_TOL) -> GroupStats:
    """Mean, unbiased std, size and zero-variance flag of each sample's group.

    mean_g = (1/n_g) sum_{i in g} r_i
    std_g  = sqrt( sum_{i in g} (r_i - mean_g)^2 / (n_g - 1) )      (0 when n_g = 1)
    zero_variance_g = max_{i in g} r_i - min_{i in g} r_i <= tol
    """
    num_groups = _check(values, group_ids)
    v = values.to(torch.float64)  # exact sums for the tests and for large batches
    gid = group_ids.long()
    # Per-group reductions, then one gather per per-sample field. index_select is used for the
    # gathers: on CPU, advanced indexing (t[gid]) costs several times more for the same result.
    count = torch.bincount(gid, minlength=num_groups).to(torch.float64)
    total = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, gid, v)
    mean = total / count.clamp(min=1)
    dev = v - mean.index_select(0, gid)
    ss = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, gid, dev * dev)
    std = torch.where(count > 1, (ss / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(ss))
    gmax = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(
        0, gid, v, reduce="amax"
    )
    gmin = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(
        0, gid, v, reduce="amin"
    )
    zero_var = (gmax - gmin) <= tol
    dtype = values.dtype if values.is_floating_point() else torch.float32
    # cast the per-group values, then gather: the same numbers as gathering first, on G instead of B elements
    return GroupStats(
        mean=mean.to(dtype).index_select(0, gid),
        std=std.to(dtype).index_select(0, gid),
        count=count.to(dtype).index_select(0, gid),
        zero_variance=zero_var.index_select(0, gid),
    )


def zero_variance_mask(values: torch.Tensor, group_ids: torch.Tensor, tol: float = ZERO_VARIANCE_TOL) -> torch.Tensor:
    """(B,) bool: True for samples whose group has all-equal values (``max - min <= tol``)."""
    return group_stats(values, group_ids, tol).zero_variance


def group_mean_per_group(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(num_groups,) mean of each group, indexed by group id (used for prompt-level quantities)."""
    num_groups = _check(values, group_ids)
    gid = group_ids.long()
    v = values.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, gid, torch.ones_like(v))
    total = torch.zeros(num_groups, dtype=torch.float64, device=v.device).index_add_(0, gid, v)
    return (total / count.clamp(min=1)).to(values.dtype if values.is_floating_point() else torch.float32)


def check_finite_rewards(rewards: torch.Tensor, name: str = "rewards") -> None:
    """Raise a clear error if any reward is NaN or infinite (no silent NaN in the weights)."""
    bad = ~torch.isfinite(rewards)
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"{name} contain {int(bad.sum())} non-finite value(s) (NaN/inf) at sample index(es) {idx}. "
            "Every reward function must return a finite float for every completion."
        )
