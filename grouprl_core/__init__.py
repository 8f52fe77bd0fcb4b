"""grouprl_core: the math of GPG, GCPO-gold, COPO and GCPO-guidance as pure torch functions.

No TRL or verl import here; both adapters call these functions. Metric names both backends
log are in :mod:`grouprl_core.names`.
"""

from .copo import (
    BLEND_MODES,
    COPOAdvantages,
    answer_keys,
    consistency_entropy,
    copo_advantages,
    copo_blend_weight,
    copo_token_loss,
    encode_answers,
    normalise_answer,
)
from .gold import (
    DEFAULT_GOLD_TEMPLATE,
    GoldPlan,
    all_wrong_groups,
    check_gold_template,
    fit_gold_completion,
    plan_gold_injection,
    render_gold,
)
from .gpg import (
    GPGAdvantages,
    GPGBatchPlan,
    age_alpha,
    global_age_alpha,
    gpg_advantages,
    gpg_needs_more,
    group_valid_flags,
    plan_gpg_batch,
    usable_valid_groups,
)
from .grpo import GRPO_STD_EPS, grpo_advantages
from .guidance import build_negative_prompt, dynamic_filter_keep, guidance_token_weights, k3_divergence, rank_power_exponent, rank_weights, token_level_advantages
from .groups import GroupStats, check_finite_rewards, contiguous_group_ids, group_stats, zero_variance_mask
from .losses import (
    AGG_MODES,
    aggregate_token_loss,
    clipped_surrogate_loss,
    importance_ratio,
    k3_kl,
    policy_gradient_loss,
    sequence_log_ratio,
)

__all__ = [
    "DEFAULT_GOLD_TEMPLATE",
    "GPGBatchPlan",
    "GRPO_STD_EPS",
    "answer_keys",
    "check_gold_template",
    "gpg_needs_more",
    "group_valid_flags",
    "k3_kl",
    "normalise_answer",
    "plan_gpg_batch",
    "render_gold",
    "usable_valid_groups",
    "BLEND_MODES",
    "COPOAdvantages",
    "GoldPlan",
    "all_wrong_groups",
    "consistency_entropy",
    "copo_advantages",
    "copo_blend_weight",
    "copo_token_loss",
    "build_negative_prompt",
    "dynamic_filter_keep",
    "encode_answers",
    "fit_gold_completion",
    "grpo_advantages",
    "guidance_token_weights",
    "k3_divergence",
    "plan_gold_injection",
    "rank_power_exponent",
    "rank_weights",
    "token_level_advantages",
    "AGG_MODES",
    "GPGAdvantages",
    "GroupStats",
    "age_alpha",
    "aggregate_token_loss",
    "check_finite_rewards",
    "clipped_surrogate_loss",
    "contiguous_group_ids",
    "global_age_alpha",
    "gpg_advantages",
    "group_stats",
    "importance_ratio",
    "policy_gradient_loss",
    "sequence_log_ratio",
    "zero_variance_mask",
]
