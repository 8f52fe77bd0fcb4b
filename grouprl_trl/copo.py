"""COPO for TRL: ``COPOTrainer`` / ``COPOConfig``, drop-in replacements for ``GRPOTrainer`` /
``GRPOConfig``.

Paper: Han et al., "COPO: Consistency-Aware Policy Optimization" (arXiv 2508.04138); official
code hijih/copo-code (``verl/trainer/ppo/core_algos.py``). The math lives in
:mod:`grouprl_core.copo`; this module moves TRL's tensors in and out.

What changes compared with GRPO, for prompt q with G completions:

- each completion's final answer is extracted (``answer_extractor``) and the group's
  consistency entropy ``H_q = -sum_a p(a) log2 p(a)`` is computed over the raw answer strings;
- local advantage ``A^loc_i = (r_i - mean_q r) / (std_q r + 1e-6)`` (GRPO);
- global advantage ``A^glob_q = (R_q - mean_B R) / (std_B R + 1e-6)`` with ``R_q = mean_i r_i``
  (optionally ``* (1 - lambda H_q)``), standardised over **all prompts of the generation batch
  of all processes** (rewards and answers are gathered before this, as TRL gathers rewards);
- gate ``w_q = sigmoid(k (H_q - b))`` and, per ``blend`` variant, a per-sample weight ``w~_i``;
- loss per token ``w~_i L^loc + (1 - w~_i) L^glob``, both dual-clip PPO (eps 0.2, c 3.0) on the
  same ratio, aggregated ``seq-mean-token-mean`` (TRL's ``loss_type="grpo"``), optional k3 KL
  (``beta``) and vLLM importance-sampling correction exactly as TRL applies them.

The local advantage goes into TRL's ``advantages`` key (and is the advantage the completions
table shows); the global advantage and the local weight travel as ``copo_global_advantages`` / ``copo_local_weight``, ``(B,)`` tensors that
TRL's shuffle and split of the generation batch (``shuffle_sequence_dict``,
``split_tensor_dict``) carry row by row through ``num_iterations`` and gradient accumulation.

Answers: the default extractor (:func:`grouprl_core.answers.final_answer`, also verl's ``pred``) returns
the string the training reward extracts (``\\boxed{..}``, ``Answer: ..``), uncanonicalised as in
the official code. When it finds nothing for a completion, that completion's answer is its
reward value (our rule, ``docs/algorithms.md`` COPO; :func:`grouprl_core.copo.answer_keys`), counted
in ``copo/extract_fallback_frac`` and warned about once.

Metrics: ``copo/consistency_entropy`` (mean H_q over prompts, bits), ``copo/gate_mean`` (mean
w_q), ``copo/global_adv_std`` (std_B R, the global advantage's normaliser; 0 means no global
signal), ``copo/local_weight_mean`` (mean w~_i), ``copo/extract_fallback_frac``, plus TRL's
reward, entropy, KL and clip metrics.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from accelerate.utils import gather_object
from trl import GRPOConfig

from grouprl_core.answers import final_answer
from grouprl_core import names
from grouprl_core.copo import (
    BLEND_MODES,
    DEFAULT_BLEND,
    DEFAULT_DUAL_CLIP,
    DEFAULT_GATE_B,
    DEFAULT_GATE_K,
    answer_keys,
    copo_advantages,
    copo_blend_weight,
    copo_token_loss,
    encode_answers,
    normalise_answer,
)
from grouprl_core.groups import contiguous_group_ids
from grouprl_core.losses import importance_ratio

from .base import GroupRLConfigMixin, GroupRLTrainer, unsupported_grpo_fields
from .base import card_paper, check_choice, check_dual_clip, choice_field, dual_clip_field

logger = logging.getLogger(__name__)

DEFAULT_ANSWER_EXTRACTOR = "grouprl_core.answers.final_answer"
LOCAL_SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------- answers
#: Old name of the default extractor (recipes and configs may still name it).
math_answer_extractor = final_answer


def resolve_answer_extractor(spec) -> Callable | None:
    """A callable from ``spec``: a callable, a dotted path ``"pkg.module.func"`` (or
    ``"pkg.module:func"``), or None (no extractor: answers are the reward values)."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"answer_extractor must be a callable, a dotted path string or None, got {spec!r}")
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"answer_extractor={spec!r} is not a dotted path like 'my_package.my_module.extract'")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"answer_extractor={spec!r} cannot be imported: {err}") from err
    if not callable(func):
        raise ValueError(f"answer_extractor={spec!r} is not callable")
    return func


# ----------------------------------------------------------------------------- config
@dataclass
class COPOConfig(GroupRLConfigMixin, GRPOConfig):
    r"""Configuration for :class:`COPOTrainer`: every ``GRPOConfig`` field plus the COPO fields below.

    Defaults follow the paper / official 7B script: k = 5, b = 1, ``only-soft`` blend, clip 0.2
    (``epsilon``; ``epsilon_high`` defaults to it), dual clip 3, ``seq-mean-token-mean``
    (``loss_type="grpo"``), no KL (``beta=0``). The official ``run_copo.sh`` uses
    ``blend="soft-with-zero"``; the 3B script k = 20, b = 1.5 and the model scripts ``beta=0.001``.
    """

    loss_type: str = field(
        default="grpo",
        metadata={"help": "COPO aggregates seq-mean-token-mean, which is TRL's 'grpo'; no other value is accepted."},
    )
    gate_k: float = field(default=DEFAULT_GATE_K, metadata={"help": "Gate slope k in w_q = sigmoid(k (H_q - b))."})
    gate_b: float = field(
        default=DEFAULT_GATE_B, metadata={"help": "Gate offset b (bits of consistency entropy) in w_q = sigmoid(k (H_q - b))."}
    )
    blend: str = choice_field(
        DEFAULT_BLEND, BLEND_MODES,
        "How the gate weighs the local loss: 'only-soft' (w_q, paper), 'soft-with-zero' (w_q, but 0 for "
        "responses with reward 0: official run_copo.sh), 'soft-with-forced' (w_q, but 0 where the local "
        "advantage is 0), 'only-global' (0), 'no-global' (1, plain GRPO with dual clip).",
    )
    entropy_reward_coef: bool = field(
        default=False,
        metadata={
            "help": "Global prompt reward R_q = mean_i r_i * (1 - lambda H_q), lambda = (1 - 1/G) / log2 G (the "
            "official reward_coef_flg; off in every official script). A flag, not a float: lambda is fixed so "
            "that the coefficient is 1/G at maximal entropy."
        },
    )
    answer_extractor: str | None = field(
        default=DEFAULT_ANSWER_EXTRACTOR,
        metadata={
            "help": "Function completion -> final-answer string (None when there is none): a dotted path, or a "
            "callable when built in Python. None: no extraction, answers are the reward values."
        },
    )
    dual_clip: float | None = dual_clip_field(DEFAULT_DUAL_CLIP)

    def __post_init__(self):
        super().__post_init__()
        for name in ("gate_k", "gate_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_choice("blend", self.blend, BLEND_MODES)
        if not isinstance(self.entropy_reward_coef, bool):
            raise ValueError(
                f"entropy_reward_coef must be True or False (lambda is fixed to (1-1/G)/log2 G), "
                f"got {self.entropy_reward_coef!r}"
            )
        resolve_answer_extractor(self.answer_extractor)  # fail at configuration time, naming the field
        check_dual_clip(self.dual_clip)
        if self.loss_type != "grpo":
            raise ValueError(
                f"loss_type={self.loss_type!r}: COPO aggregates seq-mean-token-mean, TRL's loss_type='grpo'. "
                "Leave loss_type at 'grpo'."
            )
        check_choice("scale_rewards", self.scale_rewards, LOCAL_SCALES)
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported by COPOTrainer "
                "(its advantages come from the weighted reward sum); leave it at 'sum_then_normalize'"
            )
        self.reject_unused_grpo_fields()

    UNUSED_GRPO_FIELDS = unsupported_grpo_fields("COPOTrainer")

    def to_dict(self):
        """``GRPOConfig.to_dict`` with a callable ``answer_extractor`` written as its dotted path (JSON-safe)."""
        d = super().to_dict()
        if callable(d.get("answer_extractor")):
            func = d["answer_extractor"]
            d["answer_extractor"] = f"{func.__module__}.{getattr(func, '__qualname__', repr(func))}"
        return d


# ----------------------------------------------------------------------------- trainer
class COPOTrainer(GroupRLTrainer):
    """Consistency-aware policy optimisation on top of TRL's ``GRPOTrainer`` (same constructor)."""

    config_class = COPOConfig
    algorithm_name = "COPO"
    paper = card_paper("copo")

    def init_algorithm(self):
        self._extract_answer = resolve_answer_extractor(self.args.answer_extractor)
        self._last_answers: list[str | None] | None = None
        self._warned_fallback = False

    # ------------------------------------------------------------------ generation side
    def score_completions(self, inputs, prompts, completions, completion_ids_list):
        """The base's scoring, plus this batch's answers gathered from all processes (groups may
        straddle processes, and H_q needs the whole group)."""
        rewards = super().score_completions(inputs, prompts, completions, completion_ids_list)
        extract = self._extract_answer
        answers = [None if extract is None else normalise_answer(extract(c)) for c in completions]
        self._last_answers = gather_object(answers)
        return rewards

    def assemble_batch(self, inputs):
        """TRL's batch with COPO's advantages: the local (GRPO, eps 1e-6) advantage replaces TRL's; the
        global advantage and the per-sample local-loss weight are added as ``(B,)`` tensors. All are
        computed from the rewards and answers of all processes, then this process's rows are kept."""
        batch = super().assemble_batch(inputs)
        mode = self.mode
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self.weighted_rewards(self._last_rewards_per_func)
        answers = self._last_answers
        keys = answer_keys(answers, rewards.tolist())
        fallback_frac = sum(a is None for a in answers) / max(len(answers), 1)
        if fallback_frac > 0 and not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "COPO: the answer extractor found no answer for %.0f%% of the completions of this batch; their "
                "reward values stand in as answers for the consistency entropy (see copo/extract_fallback_frac).",
                100 * fallback_frac,
            )

        group_ids = contiguous_group_ids(rewards.numel(), group_size, device=rewards.device)
        result = copo_advantages(
            rewards,
            group_ids,
            encode_answers(keys).to(rewards.device),
            gate_k=float(self.args.gate_k),
            gate_b=float(self.args.gate_b),
            entropy_reward_coef=self.args.entropy_reward_coef,
            local_scale=self.scale_rewards,
        )
        local_weight = copo_blend_weight(result.gate, rewards, result.local, self.args.blend)
        n = batch["completion_ids"].size(0)
        self.set_advantages(batch, self.local_rows(result.local, n))
        batch["copo_global_advantages"] = self.local_rows(result.global_, n).float()
        batch["copo_local_weight"] = self.local_rows(local_weight, n).float()

        per_prompt = slice(None, None, group_size)  # every sample of a group carries its prompt's value
        self.record_metric(names.COPO_CONSISTENCY_ENTROPY, result.entropy[per_prompt].mean().item())
        self.record_metric(names.COPO_GATE_MEAN, result.gate[per_prompt].mean().item())
        self.record_metric(names.COPO_GLOBAL_ADV_STD, result.global_std)
        self.record_metric(names.COPO_LOCAL_WEIGHT_MEAN, local_weight.mean().item())
        self.record_metric(names.COPO_EXTRACT_FALLBACK_FRAC, fallback_frac)
        return batch

    # ------------------------------------------------------------------ loss
    def algorithm_loss(self, model, inputs):
        """``w~ * dualclip(rho, A^loc) + (1 - w~) * dualclip(rho, A^glob)``, seq-mean-token-mean (TRL's
        ``loss_type="grpo"``), with the token or sequence ratio of ``importance_sampling_level``; the
        loss tail (vLLM correction, k3 KL with ``beta``, MoE aux loss, scaling) is the base's."""
        out = self.forward_policy(model, inputs)
        mask = self.loss_mask(inputs)
        ratio = importance_ratio(out.logps, self.old_logps(inputs, out.logps), mask, self.importance_sampling_level)
        per_token_loss = copo_token_loss(
            ratio,
            inputs["advantages"],
            inputs["copo_global_advantages"],
            inputs["copo_local_weight"],
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            dual_clip=self.args.dual_clip,
        )
        # the two losses share the ratio, so "clipped" means outside [1 - eps_low, 1 + eps_high]
        self.log_clip_metrics(ratio, mask)
        return self.finish_loss(per_token_loss, inputs, out, agg="seq-mean-token-mean", ratio=ratio)
