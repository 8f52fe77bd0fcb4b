"""grouprl's policy losses in verl's registry (``verl.trainer.ppo.core_algos.register_policy_loss``).

verl (0.9.1) calls a registered loss from ``verl.workers.utils.losses.ppo_loss`` on one micro-batch
of one data-parallel rank, all arguments by keyword:
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)``
with padded ``(bs, L)`` tensors, a bool ``response_mask`` and the actor's ``ActorConfig``. It
returns ``(scalar loss, metrics)``. ``config.global_batch_info`` carries the global token count,
global batch size and DP size that make the aggregation invariant to micro-batching and DP size;
:func:`aggregate` hands them to :func:`grouprl_core.losses.aggregate_token_loss`.

Only ``advantages`` (plus the log-probs and masks) reach a registered loss. COPO needs two more
per-sample numbers (the global advantage and the gate); :func:`grouprl_ppo_loss` wraps verl's
``ppo_loss`` and exposes the batch's ``grouprl_*`` fields to the loss through
:func:`current_loss_extras`. The grouprl trainer installs it on the actor workers
(``ActorRolloutRefWorker.set_loss_fn``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from grouprl_core.algorithms import ALGORITHMS
from grouprl_core.copo import copo_token_loss
from grouprl_core.losses import AGG_MODES, aggregate_token_loss, clipped_surrogate_loss, policy_gradient_loss

from .config import loss_options

# the registered names, from grouprl_core's table of algorithms (GCPO-gold uses verl's own gspo loss)
PG, COPO, GUIDANCE = (ALGORITHMS[key].verl.loss_mode for key in ("gpg", "copo", "guidance"))
LOSS_NAMES = (PG, COPO, GUIDANCE)
EXTRA_PREFIX = "grouprl_"
LOG_RATIO_CLAMP = 20.0  # as verl's vanilla loss: exp() of a clamped log-ratio

_LOSS_EXTRAS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("grouprl_loss_extras", default=None)


# ----------------------------------------------------------------------------- extras side channel
@contextmanager
def loss_extras(extras: dict[str, torch.Tensor]):
    """Make per-sample tensors of the current micro-batch visible to the registered losses."""
    token = _LOSS_EXTRAS.set(extras)
    try:
        yield
    finally:
        _LOSS_EXTRAS.reset(token)


def current_loss_extras(required: tuple[str, ...], loss_name: str) -> dict[str, torch.Tensor]:
    extras = _LOSS_EXTRAS.get()
    missing = [k for k in required if extras is None or k not in extras]
    if missing:
        raise RuntimeError(
            f"policy loss {loss_name!r} needs the batch fields {missing}, which verl's own ppo_loss does not pass. "
            "Run training with `python -m grouprl_verl.main_ppo` (its trainer attaches them and installs "
            "grouprl_verl.losses.grouprl_ppo_loss on the actor), or call the loss inside "
            "grouprl_verl.losses.loss_extras({...})."
        )
    return extras


def grouprl_ppo_loss(config, model_output, data, dp_group=None):
    """verl's ``ppo_loss`` (``verl.workers.utils.losses``, 0.9.1) with the batch's ``grouprl_*`` fields
    exposed to the registered loss. Same signature, same result otherwise."""
    from ._compat import ppo_loss  # verl's internal module, version-checked there

    extras = {key: data[key] for key in data.keys() if isinstance(key, str) and key.startswith(EXTRA_PREFIX)}
    with loss_extras(extras):
        return ppo_loss(config, model_output, data, dp_group)


# ----------------------------------------------------------------------------- helpers
def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, config: Any) -> torch.Tensor:
    """grouprl_core's aggregation fed with verl's ``config.global_batch_info`` (mirrors ``agg_loss``)."""
    if mode not in AGG_MODES:
        raise ValueError(f"actor_rollout_ref.actor.loss_agg_mode={mode!r} is not one of {AGG_MODES}")
    info = dict(getattr(config, "global_batch_info", None) or {})
    dp_size = int(info.get("dp_size") or 1)
    total_tokens, total_seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp_size > 1 and ((mode == "token-mean" and total_tokens is None) or (mode.startswith("seq") and total_seqs is None)):
        raise ValueError(f"dp_size={dp_size} needs the global batch_num_tokens / global_batch_size in global_batch_info")
    return aggregate_token_loss(
        loss_mat, mask, mode, total_tokens=total_tokens, total_seqs=total_seqs,
        norm_length=info.get("loss_scale_factor"), dp_size=dp_size,
    )


def _ratio(log_prob, old_log_prob):
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_ratio), log_ratio


def _clip_ranges(config) -> tuple[float, float, float]:
    clip = config.get("clip_ratio", 0.2)
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    dual = config.get("clip_ratio_c", 3.0)
    if not dual > 1.0:
        raise ValueError(f"actor_rollout_ref.actor.clip_ratio_c (dual clip) must be > 1, got {dual!r}")
    return (clip if low is None else low), (clip if high is None else high), dual


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set, as verl's ``torch_functional.masked_mean`` (0.9.1) computes it."""
    return torch.where(mask.bool(), values, 0.0).mul(mask).sum() / (mask.sum() + 1e-8)


def _clip_metrics(ratio, log_ratio, advantages, mask, low, high) -> dict[str, float]:
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
    clipped = ((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    return {
        "actor/pg_clipfrac": _masked_mean(clipped.float().expand_as(mask), mask).item(),
        "actor/ppo_kl": _masked_mean(-log_ratio, mask).item(),
    }


# ----------------------------------------------------------------------------- registered losses
@register_policy_loss(PG)
def compute_grouprl_pg_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """Plain policy gradient, GPG eq. 5: ``L = -(1/sum|o_i|) sum_{i,t} log pi(o_it) A_it`` (token-mean
    over the global batch by default). No ratio, no clip, no KL; ``old_log_prob`` is unused."""
    if config is None:
        raise ValueError(f"{PG}: verl passes the actor config; got config=None")
    loss_mat = policy_gradient_loss(log_prob, advantages)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    return aggregate(loss_mat, response_mask, loss_agg_mode, config), {}


@register_policy_loss(COPO)
def compute_grouprl_copo_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean",
                              config=None, rollout_is_weights=None):
    """COPO (Han et al., arXiv 2508.04138): ``l = w~ L^loc + (1 - w~) L^glob`` per token, both dual-clip
    PPO on one ratio (clip ``clip_ratio_low/high``, dual clip ``clip_ratio_c``); the paper aggregates
    with ``seq-mean-token-mean``. ``w~``, ``A^loc`` and ``A^glob`` are the batch fields
    ``grouprl_copo_weight``, ``grouprl_copo_local`` and ``grouprl_copo_global`` (per sample)."""
    if config is None:
        raise ValueError(f"{COPO}: verl passes the actor config; got config=None")
    extras = current_loss_extras(("grouprl_copo_local", "grouprl_copo_global", "grouprl_copo_weight"), COPO)
    low, high, dual = _clip_ranges(config)
    ratio, log_ratio = _ratio(log_prob, old_log_prob)
    local = extras["grouprl_copo_local"].to(log_prob.dtype).reshape(-1)
    global_ = extras["grouprl_copo_global"].to(log_prob.dtype).reshape(-1)
    weight = extras["grouprl_copo_weight"].to(log_prob.dtype).reshape(-1)
    if local.numel() != log_prob.size(0):
        raise ValueError(f"{COPO}: {local.numel()} per-sample COPO fields for a micro-batch of {log_prob.size(0)} rows")
    loss_mat = copo_token_loss(ratio, local, global_, weight, clip_low=low, clip_high=high, dual_clip=dual)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    metrics = _clip_metrics(ratio, log_ratio, local, response_mask, low, high)
    return aggregate(loss_mat, response_mask, loss_agg_mode, config), metrics


@register_policy_loss(GUIDANCE)
def compute_grouprl_guidance_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                  config=None, rollout_is_weights=None):
    """GCPO-guidance (Li et al., arXiv 2605.29198): DAPO-style clipped surrogate on the token-weighted
    advantage ``A_it = A_i w_it`` (clip-higher ``clip_ratio_low/high`` = 0.2/0.28, dual clip
    ``clip_ratio_c`` = 3, token-mean, no KL), plus ``entropy_penalty_coef * (-log pi(o_it))``
    (``actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef``, default 0)."""
    if config is None:
        raise ValueError(f"{GUIDANCE}: verl passes the actor config; got config=None")
    low, high, dual = _clip_ranges(config)
    ratio, log_ratio = _ratio(log_prob, old_log_prob)
    loss_mat = clipped_surrogate_loss(ratio, advantages, low, high, dual_clip=dual)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    coef = loss_options(config).entropy_penalty_coef
    if coef != 0.0:
        loss_mat = loss_mat + coef * (-log_prob)
    metrics = _clip_metrics(ratio, log_ratio, advantages, response_mask, low, high)
    return aggregate(loss_mat, response_mask, loss_agg_mode, config), metrics
