"""grouprl_core: the math of GPG, GCPO-gold, COPO and GCPO-guidance as pure torch functions.

No TRL or verl import here; both adapters call these functions. Metric names both backends
log are in :mod:`grouprl_core.names`, the table of algorithms and their backend names in
:mod:`grouprl_core.algorithms`.

The functions below are imported on first use (PEP 562 ``__getattr__``), so importing
``grouprl_core.algorithms`` or ``grouprl_core.names`` does not import torch: the ``grouprl``
CLI reads the algorithm table and must start fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "copo": ("BLEND_MODES", "COPOAdvantages", "answer_keys", "consistency_entropy", "copo_advantages",
             "copo_blend_weight", "copo_token_loss", "encode_answers", "normalise_answer"),
    "gold": ("DEFAULT_GOLD_TEMPLATE", "GoldPlan", "all_wrong_groups", "check_gold_template", "fit_gold_completion",
             "plan_gold_injection", "render_gold"),
    "gpg": ("GPGAdvantages", "GPGBatchPlan", "age_alpha", "global_age_alpha", "gpg_advantages", "gpg_needs_more",
            "group_valid_flags", "plan_gpg_batch", "usable_valid_groups"),
    "grpo": ("GRPO_STD_EPS", "grpo_advantages"),
    "guidance": ("build_negative_prompt", "dynamic_filter_keep", "guidance_token_weights", "k3_divergence",
                 "rank_power_exponent", "rank_weights", "token_level_advantages"),
    "groups": ("GroupStats", "check_finite_rewards", "contiguous_group_ids", "group_stats", "zero_variance_mask"),
    "losses": ("AGG_MODES", "aggregate_token_loss", "clipped_surrogate_loss", "importance_ratio", "k3_kl",
               "policy_gradient_loss", "sequence_log_ratio"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
