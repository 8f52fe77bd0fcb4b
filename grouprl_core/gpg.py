"""GPG: Group Policy Gradient (Chu et al., "GPG: A Simple and Strong Reinforcement Learning
Baseline for Model Reasoning", arXiv 2504.02546, ICLR 2026; official code AMAP-ML/GPG).

Advantage (paper eq. 6-7):

    A_i = alpha * (r_i - mean_{g(i)} r) / F_norm
    alpha = B / (B - M)           (AGE: accurate gradient estimation)

B = samples in the batch, M = samples in zero-variance groups (all rewards equal), both
counted over the whole *global* batch. ``F_norm`` is 1 (``"none"``, the paper's final
choice), the group std + 1e-4 (``"group"``, what the official 1.5B runs effectively used) or
the std of the whole batch + 1e-4 (``"batch"``). The loss is the plain policy gradient
``-(1/sum|o_i|) sum_{i,t} log pi(o_it) A_i`` (see :func:`grouprl_core.losses.policy_gradient_loss`).

alpha equals the official code's ``loss /= min(1, valid/total)`` (valid = samples in groups
with non-equal rewards). verl 0.9.1's built-in ``gpg`` estimator instead uses
``B / count_nonzero(rewards)``, which is a different number; ours follows the paper.

Batch planning (the valid-fraction threshold beta_th, paper Sec. 3.3): while the count of valid
groups (non-equal rewards) is below beta_th of a round's N groups, another round is generated
from fresh prompts, at most ``max_resample_rounds`` times; valid groups of every round are kept,
oldest first, and the batch is filled up with zero-variance groups of the newest round (with
whole rounds: the last round's, as the official code). Valid groups that do not fit are carried
to the next batch (at most one batch worth, so at most one step old) or dropped (official).

Two counts (:data:`VALID_COUNTS`, :func:`gpg_valid_count`), with V_p the valid groups process p
holds so far (carried + every round of this batch) and n its share of a round:

    capped:  sum_p min(V_p, n)   only groups a process can put into its batch
    global:  sum_p V_p           the official loop's running count (every valid group generated,
                                 including the ones a process with a surplus later drops)

and the threshold stops the loop when ``count / N >= beta_th`` (:func:`gpg_needs_more`). With the
global count the official code also derives alpha from it: ``alpha = 1 / min(1, count / N)``
(:func:`cumulative_alpha`), which equals B / (B - M) only when no round was discarded.

How many groups an extra round generates is :func:`gpg_round_groups` (:data:`RESAMPLE_STRATEGIES`):
``full_rounds`` (the paper: a whole generation batch) or cheaper variants that generate only what
is missing. :func:`plan_gpg_batch`, :func:`gpg_needs_more` and :func:`gpg_round_groups` work on
per-round validity flags and counts, with no tensors of the batch itself, so both backends
assemble their own batches from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .distributed import all_reduce_sum
from .groups import ZERO_VARIANCE_TOL, group_stats

F_NORM_MODES = ("none", "group", "batch")
STD_EPS = 1e-4  # as TRL's scale_rewards and the official GPG/open-rs code
DEFAULT_VALID_THRESHOLD = 0.6  # beta_th (paper)
DEFAULT_MAX_RESAMPLE_ROUNDS = 20  # official code
VALID_COUNTS = ("capped", "global")  # what the threshold counts, see gpg_valid_count
RESAMPLE_STRATEGIES = ("full_rounds", "missing_only", "expected")  # size of an extra round, see gpg_round_groups


@dataclass
class GPGAdvantages:
    advantages: torch.Tensor  # (B,) per-sample advantage, already multiplied by alpha
    alpha: float  # B / (B - M); 0.0 when every group is zero-variance
    valid_fraction: float  # (B - M) / B over the global batch
    zero_variance: torch.Tensor  # (B,) bool
    num_samples: int  # global B
    num_zero_variance: int  # global M

    @property
    def skip_update(self) -> bool:
        """True when no sample carries a learning signal: the optimizer step must be skipped."""
        return self.num_samples == self.num_zero_variance


def age_alpha(num_samples: int, num_zero_variance: int) -> float:
    """AGE scaling ``alpha = B / (B - M)``; 0.0 when ``M == B`` (nothing to learn, skip the step)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if not 0 <= num_zero_variance <= num_samples:
        raise ValueError(f"num_zero_variance={num_zero_variance} outside [0, {num_samples}]")
    valid = num_samples - num_zero_variance
    return float(num_samples) / float(valid) if valid > 0 else 0.0


def global_age_alpha(zero_variance: torch.Tensor, process_group=None) -> tuple[float, int, int]:
    """alpha from a (local) zero-variance mask, with B and M summed over ``process_group``.

    Each process must hold whole groups (a group split over processes cannot be judged
    zero-variance locally). Returns ``(alpha, B, M)``.
    """
    counts = torch.tensor(
        [zero_variance.numel(), int(zero_variance.sum())], dtype=torch.float64, device=zero_variance.device
    )
    counts = all_reduce_sum(counts, process_group)
    b, m = int(counts[0].item()), int(counts[1].item())
    return age_alpha(b, m), b, m


def _batch_std(rewards: torch.Tensor, process_group=None) -> torch.Tensor:
    """Unbiased std over all samples of the (global) batch."""
    r = rewards.to(torch.float64)
    sums = all_reduce_sum(torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()]), process_group)
    n, s, ss = sums[0], sums[1], sums[2]
    var = (ss - s * s / n) / (n - 1).clamp(min=1.0)
    return var.clamp(min=0.0).sqrt().to(rewards.dtype)


def gpg_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    f_norm: str = "none",
    use_age: bool = True,
    eps: float = STD_EPS,
    process_group=None,
    alpha: float | None = None,
) -> GPGAdvantages:
    """GPG advantages ``A_i = alpha * (r_i - mean_g) / F_norm`` with ``alpha = B / (B - M)``.

    Args:
        rewards: (B,) scalar reward per completion (finite).
        group_ids: (B,) integer id of each completion's prompt. Groups must be whole in this
            tensor; with ``process_group`` each process holds whole groups of a larger batch.
        f_norm: ``"none"`` (F_norm = 1, paper default), ``"group"`` (std_g + eps) or
            ``"batch"`` (std over the global batch + eps).
        use_age: multiply by alpha (``False`` = alpha 1, the official 1.5B runs).
        process_group: sum B, M (and the batch std) over these processes; ``None`` = local.
        alpha: the AGE factor to use instead of B / (B - M) (with ``use_age``), e.g. the official
            code's :func:`cumulative_alpha` of the resampling rounds.

    Zero-variance groups get advantage exactly 0. If every group is zero-variance, all
    advantages are 0, alpha is reported as 0 and ``skip_update`` is True.
    """
    if f_norm not in F_NORM_MODES:
        raise ValueError(f"advantage_norm/f_norm must be one of {F_NORM_MODES}, got {f_norm!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; GPG needs a finite reward for every completion")
    stats = group_stats(rewards, group_ids)
    centred = rewards - stats.mean
    if f_norm == "group":
        centred = centred / (stats.std + eps)
    elif f_norm == "batch":
        centred = centred / (_batch_std(rewards, process_group) + eps)
    centred = centred.masked_fill(stats.zero_variance, 0.0)
    batch_alpha, b, m = global_age_alpha(stats.zero_variance, process_group)
    if alpha is None or b == m:
        alpha = batch_alpha
    scale = alpha if use_age else 1.0
    advantages = centred * scale
    return GPGAdvantages(
        advantages=advantages,
        alpha=alpha if use_age else (1.0 if b > m else 0.0),
        valid_fraction=(b - m) / b,
        zero_variance=stats.zero_variance,
        num_samples=b,
        num_zero_variance=m,
    )


# ----------------------------------------------------------------------------- batch planning
def group_valid_flags(rewards: torch.Tensor, group_ids: torch.Tensor, tol: float = ZERO_VARIANCE_TOL) -> list[bool]:
    """``flags[k]`` is True when group ``k`` (ids ``0..K-1``) has non-equal rewards (a *valid* group)."""
    zero_variance = group_stats(rewards, group_ids, tol).zero_variance
    num_groups = int(group_ids.max()) + 1
    first = torch.full((num_groups,), -1, dtype=torch.long, device=group_ids.device)
    first = first.scatter_reduce(0, group_ids.long(), torch.arange(group_ids.numel(), device=group_ids.device),
                                 reduce="amax")
    return [not bool(zero_variance[i]) for i in first.tolist()]


def usable_valid_groups(round_valid: Sequence[Sequence[bool]], groups_per_batch: int) -> int:
    """Valid groups collected so far that the batch can use: ``min(#valid, groups_per_batch)``.

    This is one process's term of the ``capped`` count (:func:`gpg_valid_count`).
    """
    return min(sum(sum(bool(v) for v in flags) for flags in round_valid), groups_per_batch)


def gpg_valid_count(valid_per_process: Sequence[int], groups_per_process: int, valid_count: str = "capped") -> int:
    """The valid-group count the threshold compares with ``beta_th * N`` (N = groups of one full round).

    ``valid_per_process[p]`` = V_p, the valid groups process p holds so far (carried ones and every
    round of this batch, including valid groups it will not have room for); n = ``groups_per_process``.

        capped:  sum_p min(V_p, n)   (ours: a surplus on one process does not make up for another's gap)
        global:  sum_p V_p           (the official loop's ``n_valid_samples``: every valid group counts)
    """
    if valid_count not in VALID_COUNTS:
        raise ValueError(f"valid_count must be one of {VALID_COUNTS}, got {valid_count!r}")
    if valid_count == "global":
        return int(sum(valid_per_process))
    return int(sum(min(v, groups_per_process) for v in valid_per_process))


def gpg_needs_more(valid_fraction: float, *, threshold: float, extra_rounds: int, max_rounds: int) -> bool:
    """True while the batch's valid fraction is below ``threshold`` (beta_th) and the round bound allows
    another round. ``valid_fraction`` = :func:`gpg_valid_count` / N (N = groups of one full round, all
    processes); with the global count it may exceed 1."""
    return valid_fraction < threshold and extra_rounds < max_rounds


def cumulative_alpha(valid_groups: int, groups_per_round: int) -> float:
    """The official code's AGE factor: ``alpha = 1 / min(1, V / N)``, V = the global running count of valid
    groups over the resampling rounds (:func:`gpg_valid_count` with ``"global"``), N = groups of one
    round. 0.0 when V = 0 (nothing to learn: the step is skipped; the official code divides by 0).

    Without resampling V / N = (B - M) / B, so this equals :func:`age_alpha`; after resampling it is 1
    as soon as the rounds produced N valid groups, whatever the assembled batch holds.
    """
    if groups_per_round <= 0:
        raise ValueError(f"groups_per_round must be positive, got {groups_per_round}")
    if valid_groups <= 0:
        return 0.0
    return 1.0 / min(1.0, valid_groups / groups_per_round)


def groups_to_reach(threshold: float, groups_per_round: int) -> int:
    """The smallest count c with ``c / N >= threshold`` (the count that stops :func:`gpg_needs_more`)."""
    for c in range(groups_per_round + 1):
        if c / groups_per_round >= threshold:
            return c
    return groups_per_round


def gpg_round_groups(
    strategy: str,
    *,
    valid_groups: int,
    groups_per_round: int,
    threshold: float,
    num_processes: int,
    valid_rate: float | None = None,
) -> int:
    """Groups *each process* generates in the next extra round (every process the same number, so the
    rows of a round can be gathered). n = ``groups_per_round / num_processes``, P = ``num_processes``,
    missing = :func:`groups_to_reach` - ``valid_groups`` (the count so far):

        full_rounds:   n                                   (the paper and the official code)
        missing_only:  min(n, ceil(missing / P))           (one new group per missing valid group)
        expected:      min(n, ceil(missing / (r * P)))     (r = ``valid_rate``, valid groups per generated
                                                            group so far in this batch; n while r is unknown/0)

    Always at least 1 when something is missing.
    """
    if strategy not in RESAMPLE_STRATEGIES:
        raise ValueError(f"resample_strategy must be one of {RESAMPLE_STRATEGIES}, got {strategy!r}")
    if groups_per_round % num_processes:
        raise ValueError(f"groups_per_round={groups_per_round} is not a multiple of num_processes={num_processes}")
    per_process = groups_per_round // num_processes
    missing = max(groups_to_reach(threshold, groups_per_round) - valid_groups, 1)
    if strategy == "full_rounds":
        return per_process
    if strategy == "expected":
        if not valid_rate or valid_rate <= 0:
            return per_process
        return max(1, min(per_process, math.ceil(missing / (valid_rate * num_processes))))
    return max(1, min(per_process, math.ceil(missing / num_processes)))


@dataclass(frozen=True)
class GPGBatchPlan:
    """Which groups fill one GPG batch; a group is ``(round, group index within that round)``."""

    chosen: list[tuple[int, int]]  # batch order: valid groups oldest first, then zero-variance fillers
    carry: list[tuple[int, int]]  # valid groups that did not fit, kept for the next batch
    num_valid: int  # valid groups available over all rounds
    num_carried_used: int  # chosen groups that come from the carried round

    def groups_of(self, pairs: Sequence[tuple[int, int]], round_index: int) -> list[int]:
        """Group indices of ``round_index`` among ``pairs`` (``self.chosen`` or ``self.carry``), in order."""
        return [k for r, k in pairs if r == round_index]


def plan_gpg_batch(
    round_valid: Sequence[Sequence[bool]],
    groups_per_batch: int,
    *,
    carry_over: bool = True,
    carried_round: bool = False,
) -> GPGBatchPlan:
    """The groups of one batch from the validity flags of each round (oldest round first).

    Args:
        round_valid: ``round_valid[r][k]`` is True when group ``k`` of round ``r`` is valid. With
            ``carried_round`` round 0 holds the groups carried over from the previous batch (all valid).
        groups_per_batch: groups the batch holds (per process in TRL, per step in verl).
        carry_over: keep the valid groups that do not fit (at most ``groups_per_batch``).
    Returns:
        a :class:`GPGBatchPlan`: the first ``groups_per_batch`` valid groups, oldest first; when fewer
        exist, zero-variance groups fill the batch, newest round first, in order within a round (with
        whole rounds the last round always has enough: the official rule).
    """
    if groups_per_batch < 1:
        raise ValueError(f"groups_per_batch must be >= 1, got {groups_per_batch}")
    if not round_valid:
        raise ValueError("plan_gpg_batch needs at least one round")
    valid = [(r, k) for r, flags in enumerate(round_valid) for k, ok in enumerate(flags) if ok]
    chosen, leftover = valid[:groups_per_batch], valid[groups_per_batch:]
    if len(chosen) < groups_per_batch:
        fillers = [(r, k) for r in reversed(range(len(round_valid))) for k, ok in enumerate(round_valid[r]) if not ok]
        chosen += fillers[: groups_per_batch - len(chosen)]
    if len(chosen) < groups_per_batch:
        raise ValueError(
            f"the rounds hold {len(chosen)} groups, fewer than the batch's {groups_per_batch}: the rounds must "
            "hold at least one batch of groups"
        )
    return GPGBatchPlan(
        chosen=chosen,
        carry=leftover[:groups_per_batch] if carry_over else [],
        num_valid=len(valid),
        num_carried_used=sum(1 for r, _ in chosen if r == 0) if carried_round else 0,
    )
