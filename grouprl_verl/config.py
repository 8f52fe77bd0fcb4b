"""Typed, validated options of the grouprl verl adapters.

Two places in verl's Hydra config carry them (see ``grouprl_verl/README.md``):

* ``algorithm.grouprl.<algo>.*`` (algo = ``gpg``, ``gcpo``, ``copo``, ``guidance``): read by the
  advantage estimators and the trainer hooks. verl hands ``config.algorithm`` to an estimator as
  the raw OmegaConf ``DictConfig`` (``verl.trainer.ppo.ray_trainer.compute_advantage``, 0.9.1), so
  extra keys pass through untouched; we validate them here.
* ``actor_rollout_ref.actor.policy_loss.grouprl.*``: read by the policy losses. verl instantiates
  ``policy_loss`` as the dataclass ``verl.workers.config.PolicyLossConfig``, which rejects unknown
  keys, so our YAMLs point its ``_target_`` at :class:`GroupRLPolicyLossConfig` (a subclass with one
  extra field, ``grouprl``).

A missing block means the paper's defaults. Every default both backends share is grouprl_core's
constant, the same one the TRL configs use (``tests/test_shared_defaults.py`` compares them by
name). An unknown key or a bad value is a ``ValueError`` that names the full config path and the
allowed values.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from verl.base_config import BaseConfig
from verl.workers.config import PolicyLossConfig

from grouprl_core.copo import BLEND_MODES, COPO_STD_EPS, DEFAULT_BLEND, DEFAULT_GATE_B, DEFAULT_GATE_K
from grouprl_core.gold import (
    DEFAULT_CORRECT_THRESHOLD,
    DEFAULT_GOLD_TEMPLATE,
    PLACEMENTS,
    TRIGGERS,
    check_gold_template,
)
from grouprl_core.gpg import DEFAULT_MAX_RESAMPLE_ROUNDS, DEFAULT_VALID_THRESHOLD, F_NORM_MODES, STD_EPS
from grouprl_core.grpo import GRPO_STD_EPS
from grouprl_core.guidance import (
    DEFAULT_RANK_X,
    DEFAULT_RANK_Y,
    FILTER_HIGH,
    FILTER_LOW,
    NEGATIVE_PROMPT_TYPES,
)


def _fail(path: str, message: str):
    raise ValueError(f"{path}: {message}")


@dataclass
class GPGOptions:
    """``algorithm.grouprl.gpg``: GPG (Chu et al., arXiv 2504.02546). Defaults = the paper's preset."""

    f_norm: str = "none"  # F_norm: "none" (1), "group" (group std + 1e-4), "batch" (batch std + 1e-4)
    use_age: bool = True  # alpha = B / (B - M)
    valid_threshold: float = DEFAULT_VALID_THRESHOLD  # beta_th; 0 disables the threshold / carry-over hook
    max_resample_rounds: int = DEFAULT_MAX_RESAMPLE_ROUNDS  # bound on extra generation batches per step
    carry_over: bool = True  # keep valid groups that did not fit for the next step
    std_eps: float = STD_EPS

    def validate(self, path: str) -> None:
        if self.f_norm not in F_NORM_MODES:
            _fail(f"{path}.f_norm", f"must be one of {F_NORM_MODES}, got {self.f_norm!r}")
        if not 0.0 <= float(self.valid_threshold) <= 1.0:
            _fail(f"{path}.valid_threshold", f"beta_th must be in [0, 1], got {self.valid_threshold!r}")
        if int(self.max_resample_rounds) < 0:
            _fail(f"{path}.max_resample_rounds", f"must be >= 0, got {self.max_resample_rounds!r}")
        if not self.std_eps > 0:
            _fail(f"{path}.std_eps", f"must be > 0, got {self.std_eps!r}")

    def skip_reason(self, rollout_n: int) -> str:
        """Why a GPG update is skipped and which verl keys help (the skipped-step warnings of the trainer)."""
        key = "algorithm.grouprl.gpg"
        if self.valid_threshold > 0:
            rounds = (f"all {self.max_resample_rounds + 1} generation rounds of the step ({key}.max_resample_rounds="
                      f"{self.max_resample_rounds}) held no valid group")
            more = f"raise {key}.max_resample_rounds"
        else:
            rounds = f"{key}.valid_threshold=0, so no extra generation round was tried"
            more = f"set {key}.valid_threshold > 0 (beta_th; GPG then generates extra rounds from fresh prompts)"
        return (
            f"no group in the batch has non-equal rewards (every response of each prompt got the same reward, so "
            f"every advantage is 0; {rounds}). Use prompts the model solves sometimes, check that the reward function "
            f"scores these responses (a parser or length cut that always gives 0), raise actor_rollout_ref.rollout.n "
            f"(now {rollout_n}), or {more}"
        )


@dataclass
class GCPOOptions:
    """``algorithm.grouprl.gcpo``: GCPO-gold (Wu & Liu, arXiv 2510.07790; no official code, our reading in
    docs/algorithms.md)."""

    eps: float = GRPO_STD_EPS  # A = (r - mean_g) / (std_g + eps), TRL's GRPO number
    correct_threshold: float = DEFAULT_CORRECT_THRESHOLD  # a rollout is correct when its reward >= this
    trigger: str = "all_wrong"  # "all_wrong" | "always" | "never"
    placement: str = "replace"  # only "replace" in verl (the batch size is fixed by the time rewards exist)
    solution_key: str = "solution"  # non_tensor_batch / extra_info key with the reference solution
    gold_template: str = DEFAULT_GOLD_TEMPLATE  # how the solution is rendered as a completion (render_gold)

    def validate(self, path: str) -> None:
        if not self.eps > 0:
            _fail(f"{path}.eps", f"must be > 0, got {self.eps!r}")
        if self.trigger not in TRIGGERS:
            _fail(f"{path}.trigger", f"must be one of {TRIGGERS}, got {self.trigger!r}")
        if self.placement not in PLACEMENTS:
            _fail(f"{path}.placement", f"must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.placement == "append":
            _fail(
                f"{path}.placement",
                "'append' (gold as member G+1) is not available in verl: the batch size is fixed when rewards "
                "are known (train_batch_size * rollout.n must stay divisible by the DP size). Use 'replace'.",
            )
        check_gold_template(self.gold_template, f"{path}.gold_template")
        if not math.isfinite(float(self.correct_threshold)):
            _fail(f"{path}.correct_threshold", f"must be a finite number, got {self.correct_threshold!r}")


@dataclass
class COPOOptions:
    """``algorithm.grouprl.copo``: COPO (Han et al., arXiv 2508.04138; hijih/copo-code)."""

    gate_k: float = DEFAULT_GATE_K  # w_q = sigmoid(k (H_q - b)); 7B script
    gate_b: float = DEFAULT_GATE_B
    eps: float = COPO_STD_EPS  # the official code's 1e-6, local and global
    entropy_reward_coef: bool = False  # R_q = mean r * (1 - lambda H_q)
    blend: str = DEFAULT_BLEND
    # reward_extra_info key with the extracted final answer ("" or None: no answer, the reward value stands in,
    # grouprl_core.copo.answer_keys); null: no answers at all, every completion is keyed by its reward
    answer_key: str | None = "pred"

    def validate(self, path: str) -> None:
        if self.blend not in BLEND_MODES:
            _fail(f"{path}.blend", f"must be one of {BLEND_MODES}, got {self.blend!r}")
        if not math.isfinite(float(self.gate_k)) or not math.isfinite(float(self.gate_b)):
            _fail(path, f"gate_k and gate_b must be finite, got k={self.gate_k!r}, b={self.gate_b!r}")
        if not self.eps > 0:
            _fail(f"{path}.eps", f"must be > 0, got {self.eps!r}")


@dataclass
class GuidanceOptions:
    """``algorithm.grouprl.guidance``: GCPO-guidance (Li et al., arXiv 2605.29198; jacklishufan/gcpo)."""

    eps: float = GRPO_STD_EPS  # the per-sequence GRPO advantage, TRL's number
    dynamic_filter: bool = True  # groups with mean accuracy <= filter_low or >= filter_high get no update
    filter_low: float = FILTER_LOW
    filter_high: float = FILTER_HIGH
    accuracy_key: str | None = None  # reward_extra_info key for "accuracy"; null: the summed reward
    rank_x: float = DEFAULT_RANK_X
    rank_y: float = DEFAULT_RANK_Y
    negative_prompt_type: str = "wrong_answer"
    negative_template: str | None = None

    def validate(self, path: str) -> None:
        for name in ("rank_x", "rank_y"):
            value = getattr(self, name)
            if not 0.0 < float(value) < 1.0:
                _fail(f"{path}.{name}", f"must be in (0, 1), got {value!r}")
        if self.rank_y < self.rank_x:
            _fail(f"{path}.rank_y", f"rank_y={self.rank_y} < rank_x={self.rank_x} favours low-divergence tokens")
        if not 0.0 <= self.filter_low < self.filter_high <= 1.0:
            _fail(path, f"need 0 <= filter_low < filter_high <= 1, got {self.filter_low!r}, {self.filter_high!r}")
        if self.negative_prompt_type not in NEGATIVE_PROMPT_TYPES:
            _fail(f"{path}.negative_prompt_type", f"must be one of {NEGATIVE_PROMPT_TYPES}, got {self.negative_prompt_type!r}")
        if self.negative_prompt_type == "custom" and not self.negative_template:
            _fail(f"{path}.negative_template", "negative_prompt_type='custom' needs a format string with {prompt}")

    def skip_reason(self) -> str:
        """Why a guidance update is skipped and which verl keys help (the skipped-step warnings of the trainer)."""
        key = "algorithm.grouprl.guidance"
        accuracy = (f"the reward score (or set {key}.accuracy_key to a reward extra holding it)"
                    if self.accuracy_key is None else f"reward extra {key}.accuracy_key={self.accuracy_key!r}")
        return (
            f"the dynamic filter dropped every group (no group's mean accuracy is strictly between {self.filter_low} "
            f"and {self.filter_high}: every prompt was solved by all or by none of its responses). Check that the "
            f"accuracy, {accuracy}, is a 0/1 correctness score, use prompts the model solves sometimes, or set "
            f"{key}.dynamic_filter=false"
        )


ALGO_OPTIONS = {"gpg": GPGOptions, "gcpo": GCPOOptions, "copo": COPOOptions, "guidance": GuidanceOptions}


def _as_plain(block: Any) -> dict:
    if block is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(block, DictConfig):
            return OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    if isinstance(block, dict):
        return dict(block)
    raise ValueError(f"expected a mapping, got {type(block).__name__}: {block!r}")


def _build(cls, values: dict, path: str):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
    options = cls(**values)
    for f in fields(cls):  # type-check numbers and bools (YAML "5" vs 5, "true" vs true)
        value = getattr(options, f.name)
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool) and not isinstance(value, bool):
            _fail(f"{path}.{f.name}", f"must be true/false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(f"{path}.{f.name}", f"must be a number, got {value!r}")
    options.validate(path)
    return options


def algo_options(algorithm_config: Any, algo: str):
    """Typed options of ``algorithm.grouprl.<algo>`` (paper defaults where the block or a key is missing).

    ``algorithm_config`` is what verl passes to an estimator as ``config`` (``config.algorithm``,
    a DictConfig) or ``None`` (then all defaults).
    """
    if algo not in ALGO_OPTIONS:
        raise ValueError(f"unknown grouprl algorithm {algo!r}; one of {list(ALGO_OPTIONS)}")
    path = f"algorithm.grouprl.{algo}"
    grouprl = None if algorithm_config is None else algorithm_config.get("grouprl", None)
    block = _as_plain(grouprl).get(algo) if grouprl is not None else None
    return _build(ALGO_OPTIONS[algo], _as_plain(block), path)


# ----------------------------------------------------------------------------- policy-loss side
@dataclass
class GroupRLLossOptions(BaseConfig):
    """``actor_rollout_ref.actor.policy_loss.grouprl``: options of the grouprl policy losses.

    The clip ranges come from verl's own actor keys (``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c``), the aggregation from ``loss_agg_mode``.
    """

    entropy_penalty_coef: float = 0.0  # grouprl_guidance: + coef * (-log pi(o_t)) per token (official: 0.02/0.16)

    def __post_init__(self):
        if isinstance(self.entropy_penalty_coef, bool) or not isinstance(self.entropy_penalty_coef, (int, float)):
            _fail("actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef",
                  f"must be a number, got {self.entropy_penalty_coef!r}")
        if not math.isfinite(self.entropy_penalty_coef):
            _fail("actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef",
                  f"must be finite, got {self.entropy_penalty_coef!r}")


@dataclass
class GroupRLPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` (0.9.1) plus the ``grouprl`` block.

    Use with ``actor_rollout_ref.actor.policy_loss._target_=grouprl_verl.config.GroupRLPolicyLossConfig``
    (our YAMLs set it). A plain mapping given for ``grouprl`` (e.g. from ``+...grouprl.x=1`` on the
    command line, without a nested ``_target_``) is converted and validated here.
    """

    grouprl: Any = field(default_factory=GroupRLLossOptions)

    def __post_init__(self):
        value = self.grouprl
        if not isinstance(value, GroupRLLossOptions):
            plain = _as_plain(value)
            plain.pop("_target_", None)
            allowed = {f.name for f in fields(GroupRLLossOptions)} - {"_target_"}
            unknown = sorted(set(plain) - allowed)
            if unknown:
                _fail("actor_rollout_ref.actor.policy_loss.grouprl", f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            object.__setattr__(self, "grouprl", GroupRLLossOptions(**plain))


def loss_options(actor_config: Any) -> GroupRLLossOptions:
    """The ``grouprl`` block of ``actor_config.policy_loss``; defaults when verl's own config class is used."""
    policy_loss = actor_config.get("policy_loss", None) if actor_config is not None else None
    block = None if policy_loss is None else policy_loss.get("grouprl", None)
    if block is None:
        return GroupRLLossOptions()
    if isinstance(block, GroupRLLossOptions):
        return block
    plain = _as_plain(block)
    plain.pop("_target_", None)
    return GroupRLLossOptions(**plain)


def options_as_dict(options) -> dict:
    return {k: v for k, v in asdict(options).items() if k != "_target_"}
