"""grouprl's advantage estimators in verl's registry (``verl.trainer.ppo.core_algos.register_adv_est``).

verl (0.9.1) calls a registered estimator from ``verl.trainer.ppo.ray_trainer.compute_advantage`` as
``fn(token_level_rewards=(B, L), response_mask=(B, L), config=config.algorithm, index=uid array)``
on the driver, with the whole generation batch. So every statistic here (group stats, GPG's alpha,
COPO's batch standardisation) is global by construction: no process group is needed.

The math is grouprl_core's; these functions only turn verl's tensors into grouprl_core's flat
``(rewards, group_ids)`` and broadcast the per-sample advantage back over the response tokens.
Names carry a ``grouprl_`` prefix so verl's own estimators (e.g. its ``gpg``, whose alpha is
``B / count_nonzero(rewards)`` instead of the paper's ``B / (B - M)``) stay untouched.

Each estimator records its metrics (``gpg/alpha``, ...) in :data:`LAST_METRICS`; the trainer of
:mod:`grouprl_verl.trainer` logs them (a registered estimator cannot return metrics to verl).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pandas as pd
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from grouprl_core import names
from grouprl_core.algorithms import ALGORITHMS
from grouprl_core.gpg import gpg_advantages
from grouprl_core.grpo import grpo_advantages

from .config import algo_options

# the registered names, from grouprl_core's table of algorithms
GPG, GCPO, COPO, GUIDANCE = (ALGORITHMS[key].verl.adv_estimator for key in ("gpg", "gcpo_gold", "copo", "guidance"))
ESTIMATOR_NAMES = (GPG, GCPO, COPO, GUIDANCE)

LAST_METRICS: dict[str, float] = {}


def group_ids_from_index(index, batch_size: int, estimator: str) -> torch.Tensor:
    """(B,) integer group ids from verl's per-sample ``uid`` array (one uuid string per prompt)."""
    if index is None:
        raise ValueError(
            f"{estimator}: no 'uid' in the batch's non_tensor_batch, so the groups are unknown. verl's trainers set "
            "batch.non_tensor_batch['uid'] per prompt before rollout.n repeats; a custom trainer must do the same."
        )
    index = np.ascontiguousarray(index, dtype=object)
    if index.shape != (batch_size,):
        raise ValueError(f"{estimator}: index has shape {index.shape}, expected ({batch_size},) (one uid per sample)")
    # Hashing every uid string costs 0.4-1 s at 1M samples on CPU (each lookup reads a string object at a
    # random address); sorting them (np.unique) more. verl's trainer repeats each prompt's uid object
    # rollout.n times (np.repeat copies references) and balance_batch then reorders the samples. So group
    # by object first, using the addresses the object array itself stores (read without touching the
    # objects), then the few distinct objects by value (pandas' hash table): equal strings held by
    # different objects still share a group, so the result is exact for any input; on verl's batches
    # it is 3-7x faster than hashing the strings at 65k-1M samples (bench/advantage_scale.py).
    addresses = np.ctypeslib.as_array((ctypes.c_ssize_t * batch_size).from_address(index.ctypes.data))
    by_object, objects = pd.factorize(addresses)
    one_sample_per_object = np.empty(len(objects), dtype=np.intp)
    one_sample_per_object[by_object] = np.arange(batch_size)  # any sample holding the object will do
    by_value, _ = pd.factorize(index[one_sample_per_object])
    if (by_value < 0).any():
        bad = np.flatnonzero(by_value[by_object] < 0)[:8].tolist()
        raise ValueError(f"{estimator}: uid is missing (None/NaN) at sample index(es) {bad}; every sample needs its "
                         "prompt's uid in non_tensor_batch['uid']")
    return torch.from_numpy(by_value[by_object].astype(np.int64, copy=False))


def sequence_rewards(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """(B,) outcome reward per sample: the sum of its token-level rewards (verl puts it on the last token)."""
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"{estimator}: token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} differ in shape"
        )
    return token_level_rewards.sum(dim=-1)


def _broadcast(per_sample: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) float32: each sample's value on its response tokens, 0 on padding.

    verl's mask is the int64 attention mask (on the driver's CPU). There, converting it to float32
    (a vectorised copy that is also the fresh output) and multiplying in place is about 2x faster
    than one mixed-dtype multiply, whose int64 -> float cast runs element by element. A float32 mask,
    or one on an accelerator, takes the single fused multiply.
    """
    values = per_sample.to(torch.float32).unsqueeze(-1)
    if response_mask.dtype == torch.float32 or response_mask.device.type != "cpu":
        return values * response_mask
    return response_mask.to(torch.float32).mul_(values)


@register_adv_est(GPG)
def compute_grouprl_gpg_advantage(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    """GPG (Chu et al., arXiv 2504.02546): ``A_i = alpha (r_i - mean_g) / F_norm``, ``alpha = B / (B - M)``.

    M counts samples in zero-variance groups of the whole generation batch. Options:
    ``algorithm.grouprl.gpg.{f_norm, use_age, std_eps}`` (defaults: F_norm 1, AGE on). When every
    group is zero-variance all advantages are 0 and ``gpg/skipped_step`` is 1: the grouprl trainer
    then skips the actor update (a zero loss would still let AdamW's weight decay move the weights).
    """
    opts = algo_options(config, "gpg")
    rewards = sequence_rewards(token_level_rewards, response_mask, GPG)
    group_ids = group_ids_from_index(index, rewards.numel(), GPG)
    result = gpg_advantages(rewards, group_ids, f_norm=opts.f_norm, use_age=opts.use_age, eps=opts.std_eps)
    LAST_METRICS.clear()
    LAST_METRICS.update({
        names.GPG_VALID_FRACTION: result.valid_fraction,
        names.GPG_SKIPPED_STEP: float(result.skip_update),
    })
    if not result.skip_update:  # as GPGTrainer: a skipped step has no step size to log
        LAST_METRICS[names.GPG_ALPHA] = result.alpha
    advantages = _broadcast(result.advantages, response_mask)
    return advantages, advantages


def _grpo(token_level_rewards, response_mask, index, config, name: str, eps: float):
    rewards = sequence_rewards(token_level_rewards, response_mask, name)
    group_ids = group_ids_from_index(index, rewards.numel(), name)
    scale = "group" if (config is None or config.get("norm_adv_by_std_in_grpo", True)) else "none"
    advantages = _broadcast(grpo_advantages(rewards, group_ids, scale=scale, eps=eps), response_mask)
    return advantages, advantages


@register_adv_est(GCPO)
def compute_grouprl_gcpo_advantage(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    """GCPO-gold (Wu & Liu, arXiv 2510.07790; docs/algorithms.md): GRPO's ``A = (r - mean_g) / (std_g + eps)``.

    Computed on the rewards *after* the grouprl trainer put the reference solution into all-wrong
    groups (:func:`grouprl_verl.hooks.inject_gold`), so those groups get a signal.
    ``algorithm.norm_adv_by_std_in_grpo=false`` drops the std (Dr. GRPO).
    """
    opts = algo_options(config, "gcpo")
    LAST_METRICS.clear()
    return _grpo(token_level_rewards, response_mask, index, config, GCPO, opts.eps)


@register_adv_est(COPO)
def compute_grouprl_copo_advantage(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    """COPO (Han et al., arXiv 2508.04138): the *local* advantage ``A^loc = (r - mean_q) / (std_q + eps)``.

    COPO's loss also needs the global advantage ``A^glob_q`` and the gate ``w_q = sigmoid(k (H_q - b))``
    of each prompt, which depend on the extracted final answers (not passed to estimators by verl).
    The grouprl trainer attaches them to the batch (:func:`grouprl_verl.hooks.attach_copo_fields`)
    and the ``grouprl_copo`` policy loss reads them.
    """
    opts = algo_options(config, "copo")
    LAST_METRICS.clear()
    rewards = sequence_rewards(token_level_rewards, response_mask, COPO)
    group_ids = group_ids_from_index(index, rewards.numel(), COPO)
    advantages = _broadcast(grpo_advantages(rewards, group_ids, scale="group", eps=opts.eps), response_mask)
    return advantages, advantages


@register_adv_est(GUIDANCE)
def compute_grouprl_guidance_advantage(token_level_rewards, response_mask, index=None, config=None, **kwargs):
    """GCPO-guidance (Li et al., arXiv 2605.29198): the per-sequence GRPO advantage ``A_i``.

    The token credit ``A_it = A_i * w_it`` (k3 rank weights from the negative-context pass) and the
    dynamic group filter are applied by the grouprl trainer before the actor update
    (:func:`grouprl_verl.hooks.apply_guidance_weights`, :func:`grouprl_verl.hooks.guidance_filter`).
    """
    opts = algo_options(config, "guidance")
    LAST_METRICS.clear()
    return _grpo(token_level_rewards, response_mask, index, config, GUIDANCE, opts.eps)
