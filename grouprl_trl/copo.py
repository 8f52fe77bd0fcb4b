"""COPO for TRL: ``COPOTrainer`` / ``COPOConfig``, drop-in replacements for ``GRPOTrainer`` /
``GRPOConfig`` (TRL 1.16).

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

The local advantage goes into TRL's ``advantages`` key; the global advantage and the local
weight travel as ``copo_global_advantages`` / ``copo_local_weight``, ``(B,)`` tensors that
TRL's shuffle and split of the generation batch (``shuffle_sequence_dict``,
``split_tensor_dict``) carry row by row through ``num_iterations`` and gradient accumulation.

Answers: the default extractor (:func:`grouprl_core.answers.final_answer`, also verl's ``pred``) returns
the string the training reward extracts (``\\boxed{..}``, ``Answer: ..``), uncanonicalised as in
the official code. When it finds nothing for a completion, that completion's answer is its
reward value (SPEC's fallback), counted in ``copo/extract_fallback_frac`` and warned about once.

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

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer

from grouprl_core.answers import final_answer
from grouprl_core.copo import BLEND_MODES, copo_advantages, copo_blend_weight, copo_token_loss, encode_answers
from grouprl_core.groups import contiguous_group_ids
from grouprl_core.losses import aggregate_token_loss, importance_ratio

from .config_checks import reject_unused_grpo_fields

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
class COPOConfig(GRPOConfig):
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
    gate_k: float = field(default=5.0, metadata={"help": "Gate slope k in w_q = sigmoid(k (H_q - b))."})
    gate_b: float = field(
        default=1.0, metadata={"help": "Gate offset b (bits of consistency entropy) in w_q = sigmoid(k (H_q - b))."}
    )
    blend: str = field(
        default="only-soft",
        metadata={
            "help": "How the gate weighs the local loss: 'only-soft' (w_q, paper), 'soft-with-zero' (w_q, but 0 for "
            "responses with reward 0: official run_copo.sh), 'soft-with-forced' (w_q, but 0 where the local "
            "advantage is 0), 'only-global' (0), 'no-global' (1, plain GRPO with dual clip).",
            "choices": list(BLEND_MODES),
        },
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
    dual_clip: float | None = field(
        default=3.0,
        metadata={"help": "Dual-clip constant c > 1: for A < 0 the per-token loss is capped at -c*A. None disables."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("gate_k", "gate_b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {self.blend!r}")
        if not isinstance(self.entropy_reward_coef, bool):
            raise ValueError(
                f"entropy_reward_coef must be True or False (lambda is fixed to (1-1/G)/log2 G), "
                f"got {self.entropy_reward_coef!r}"
            )
        resolve_answer_extractor(self.answer_extractor)  # fail at configuration time, naming the field
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip!r}")
        if self.loss_type != "grpo":
            raise ValueError(
                f"loss_type={self.loss_type!r}: COPO aggregates seq-mean-token-mean, TRL's loss_type='grpo'. "
                "Leave loss_type at 'grpo'."
            )
        if self.scale_rewards not in LOCAL_SCALES:
            raise ValueError(f"scale_rewards must be one of {LOCAL_SCALES}, got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported by COPOTrainer "
                "(its advantages come from the weighted reward sum); leave it at 'sum_then_normalize'"
            )
        reject_unused_grpo_fields(self, {
            "top_entropy_quantile": ((1.0,), "not supported by COPOTrainer"),
            "off_policy_mask_threshold": ((None,), "not supported by COPOTrainer"),
            "delta": ((None,), "not supported by COPOTrainer"),
            "entropy_coef": ((0.0,), "not supported by COPOTrainer"),
            "use_adaptive_entropy": ((False,), "not supported by COPOTrainer"),
        })

    def to_dict(self):
        """``GRPOConfig.to_dict`` with a callable ``answer_extractor`` written as its dotted path (JSON-safe)."""
        d = super().to_dict()
        if callable(d.get("answer_extractor")):
            func = d["answer_extractor"]
            d["answer_extractor"] = f"{func.__module__}.{getattr(func, '__qualname__', repr(func))}"
        return d


# ----------------------------------------------------------------------------- trainer
class COPOTrainer(GRPOTrainer):
    """Consistency-aware policy optimisation on top of TRL's ``GRPOTrainer`` (same constructor)."""

    _tag_names = ["trl", "copo", "grouprl"]
    _name = "COPO"
    _paper = {"title": "COPO: Consistency-Aware Policy Optimization", "id": "2508.04138"}

    def __init__(self, model, reward_funcs=None, args: COPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = COPOConfig(f"{str(name).split('/')[-1] or 'model'}-COPO")
        if not isinstance(args, COPOConfig):
            raise TypeError(f"COPOTrainer needs args=COPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self._extract_answer = resolve_answer_extractor(args.answer_extractor)
        self._last_rewards_per_func: torch.Tensor | None = None
        self._last_answers: list[str | None] | None = None
        self._warned_fallback = False

    # ------------------------------------------------------------------ generation side
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """``GRPOTrainer._calculate_rewards`` (TRL 1.16), plus this batch's answers gathered from all
        processes (groups may straddle processes, and H_q needs the whole group)."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._extract_answer is None:
            answers = [None] * len(completions)
        else:
            answers = [self._extract_answer(c) for c in completions]
        # None or a blank string: nothing extracted (handled by the reward-value fallback)
        answers = [None if a is None or not str(a).strip() else str(a) for a in answers]
        self._last_answers = gather_object(answers)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """``GRPOTrainer._generate_and_score_completions`` (TRL 1.16), then COPO's advantages.

        TRL's ``advantages`` are replaced by the local (GRPO, eps 1e-6) advantage; the global
        advantage and the per-sample local-loss weight are added as ``(B,)`` tensors. Everything
        is computed from the rewards and answers of all processes, then this process's rows
        are sliced, as TRL does with its own advantages.
        """
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = self._global_rewards()
        answers = self._last_answers
        if len(answers) != rewards.numel():
            raise RuntimeError(f"{len(answers)} answers for {rewards.numel()} rewards")

        missing = [a is None for a in answers]
        # SPEC fallback: a completion without an extracted answer counts its reward value as its answer
        keys = [f"\x00reward={r:.6g}" if miss else a for a, r, miss in zip(answers, rewards.tolist(), missing)]
        fallback_frac = sum(missing) / max(len(missing), 1)
        if fallback_frac > 0 and not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "COPO: the answer extractor found no answer for %.0f%% of the completions of this batch; their "
                "reward values stand in as answers for the consistency entropy (see copo/extract_fallback_frac).",
                100 * fallback_frac,
            )

        device = rewards.device
        group_ids = contiguous_group_ids(rewards.numel(), group_size, device=device)
        result = copo_advantages(
            rewards,
            group_ids,
            encode_answers(keys).to(device),
            gate_k=float(self.args.gate_k),
            gate_b=float(self.args.gate_b),
            entropy_reward_coef=self.args.entropy_reward_coef,
            local_scale=self.scale_rewards,
        )
        local_weight = copo_blend_weight(result.gate, rewards, result.local, self.args.blend)

        n = output["completion_ids"].size(0)
        rows = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        output["advantages"] = result.local[rows].float()
        output["copo_global_advantages"] = result.global_[rows].float()
        output["copo_local_weight"] = local_weight[rows].float()

        # the completions table shows the advantage the loss uses for the local part (TRL 1.16 logged its own)
        table = self._logs["advantages"]
        for _ in range(min(rewards.numel(), len(table))):
            table.pop()
        table.extend(result.local.tolist())

        per_prompt = slice(None, None, group_size)  # every sample of a group carries its prompt's value
        metrics = self._metrics[mode]
        metrics["copo/consistency_entropy"].append(result.entropy[per_prompt].mean().item())
        metrics["copo/gate_mean"].append(result.gate[per_prompt].mean().item())
        metrics["copo/global_adv_std"].append(result.global_std)
        metrics["copo/local_weight_mean"].append(local_weight.mean().item())
        metrics["copo/extract_fallback_frac"].append(fallback_frac)
        return output

    def _global_rewards(self) -> torch.Tensor:
        """Weighted reward sum of the gathered batch, as TRL's ``sum_then_normalize``; a completion that
        no reward function scored (all None/NaN) is an error: it would silently change H_q and R_q."""
        rpf = self._last_rewards_per_func
        unscorable = torch.isnan(rpf).all(dim=1)
        if unscorable.any() or torch.isinf(rpf).any():
            raise ValueError(
                f"{int(unscorable.sum())} completion(s) got None/NaN from every reward function (or a reward is inf). "
                "COPO needs a finite reward for every completion: return 0.0 for wrong or malformed answers."
            )
        return (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        """``w~ * dualclip(rho, A^loc) + (1 - w~) * dualclip(rho, A^glob)``, seq-mean-token-mean.

        Mirrors ``GRPOTrainer._compute_loss`` (TRL 1.16, grpo_trainer.py:3020) for
        ``loss_type="grpo"``: same forward, same old-log-prob / token-or-sequence ratio, same
        k3 KL with ``beta`` (and its bias correction), same vLLM importance-sampling correction,
        same aggregation and gradient-accumulation scaling (``loss_is_scaled_for_ga = True``).
        """
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
        ratio = importance_ratio(per_token_logps, old_per_token_logps, mask, self.importance_sampling_level)

        per_token_loss = copo_token_loss(
            ratio,
            inputs["advantages"],
            inputs["copo_global_advantages"],
            inputs["copo_local_weight"],
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            dual_clip=self.args.dual_clip,
        )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        per_token_loss = per_token_loss.expand_as(mask)  # (B, 1) with sequence-level ratios
        loss = aggregate_token_loss(per_token_loss, mask, "seq-mean-token-mean") / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss).mean().item())

        self._log_loss_metrics(entropies, ratio, mask, mode, per_token_kl if self.beta != 0.0 else None)
        return loss

    def _log_loss_metrics(self, entropies, ratio, mask, mode, per_token_kl=None):
        m = mask.to(torch.float32)

        def global_mean(x):
            x = x.detach().expand_as(m).to(torch.float32)
            totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        # the two losses share the ratio, so "clipped" here means outside [1 - eps_low, 1 + eps_high]
        low = ratio < 1 - self.epsilon_low
        high = ratio > 1 + self.epsilon_high
        self._metrics[mode]["entropy"].append(global_mean(entropies))
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(low | high))
        if per_token_kl is not None:
            self._metrics[mode]["kl"].append(global_mean(per_token_kl))
