"""GCPO-guidance for TRL: ``GuidanceGCPOTrainer`` / ``GuidanceGCPOConfig``, drop-in replacements
for ``GRPOTrainer`` / ``GRPOConfig``.

Paper: Li et al., "Guidance Contrastive Token Credit Assignment for Discrete Policy
Optimization" (arXiv 2605.29198); official code jacklishufan/gcpo (an EasyR1 fork,
``dp_actor.py``). The math lives in :mod:`grouprl_core.guidance`; this module moves TRL's
tensors in and out.

What changes compared with GRPO:
- a negative context c- is built for every prompt at generation time (``negative_prompt_type``:
  the prompt plus "Note: Intentionally generate an incorrect answer.", a prompt without the
  question, or a custom template) and tokenised with TRL's own ``_tokenize_prompts`` (chat
  templates apply); it travels in the batch as ``neg_prompt_ids`` / ``neg_prompt_mask``
  (left-padded);
- in every micro-batch of the update, the sampled completion tokens are scored under c- by
  one extra no-grad forward of the current policy (TRL's fused head divides the logits by the
  rollout temperature); the positive log-probs are the policy forward of the loss itself
  (detached), so the policy runs forward once. k3 divergence and per-sequence rank weights
  ``w_it`` (mean 1 per sequence) give token advantages ``A_it = A_i * w_it``;
- loss: PPO clip with clip-higher (0.2 / 0.28) and dual clip (3.0), token-mean over the
  global accumulated batch (TRL's ``loss_type="dapo"`` normaliser), no KL, plus the optional
  entropy penalty ``entropy_penalty_coef * mean(-logp)`` (same token-mean);
- dynamic filter (DAPO online filtering): groups whose mean accuracy is <= 0.01 or >= 0.99 are
  removed from the batch before the update (their rows are not forwarded at all). "Accuracy"
  is the value of one reward function, as the official filter reads the reward's per-sample
  ``accuracy`` field: the function named by ``accuracy_reward``, or the only reward function
  when there is one. It must be a correctness score in [0, 1]: several reward functions without
  ``accuracy_reward``, or a reward model as the accuracy, are start-up errors, and a scored
  value outside [0, 1] is an error naming the field (a reward of 0-5, or a reward model's score,
  would otherwise drop every group and skip every step). A None/NaN from the accuracy function
  on a row another function scored counts as 0. When no group survives on any process the
  optimizer step is skipped for real (no backward graph, so AdamW moves nothing; the step still
  counts for ``global_step`` and the LR schedule), with a warning (see ``GroupRLTrainer``).

Documented deviations / choices:
- ``weights_from="old_policy"`` computes the weights once per generation batch, from no-grad
  passes of the policy that generated it (both contexts; the positive pass reuses TRL's
  ``old_per_token_logps`` when TRL computed them). The official code uses the current policy
  in every micro-batch (``weights_from="current"``, the default). "old_policy" saves passes
  only when a generation batch feeds several updates (``num_iterations > 1``); fully on-policy
  (the TRL default) it costs one more no-grad pass than "current", whose positive scores are
  free, and gives the same weights.
- the official online filtering regenerates until the batch is full; here the batch shrinks
  (no regeneration). With ``steps_per_generation > 1`` each process keeps a multiple of
  ``steps_per_generation`` rows, filling up with removed rows whose loss mask is zeroed.
- the negative instruction is appended once (the official code's ``wrong_answer`` template
  repeats the format instruction, a quirk we do not copy). c- is built from the dataset row's
  ``prompt``; text-only (an ``image``/``images`` column is an error).

The completions table (``log_completions``) lists the rows the update used with their
sequence advantage ``A_i`` (0 for the filler rows of the filter).

Metrics: ``guidance/weight_max``, ``guidance/divergence_mean``, ``guidance/kept_frac`` (groups
kept by the filter), ``guidance/skipped_step``, plus TRL's reward, entropy and clip metrics.
``credit_map_every=N`` writes ``output_dir/credit_maps/step_{S:06d}.html`` for every generation
batch whose first update is optimizer step S (the step number the logs show) with S a multiple
of N (:mod:`grouprl_trl.credit_map`): the rows of the whole generation batch (all micro-batches
and processes, padding and filter fillers removed) with the weights and divergences the update
used, so every group is complete.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig

from grouprl_core import names
from grouprl_core.guidance import (
    DEFAULT_CLIP_HIGH,
    DEFAULT_DUAL_CLIP,
    DEFAULT_RANK_X,
    DEFAULT_RANK_Y,
    EMPTY_PROMPT,
    FILTER_HIGH,
    FILTER_LOW,
    NEGATIVE_PROMPT_TYPES,
    WRONG_ANSWER_SUFFIX,
    build_negative_prompt,
    dynamic_filter_keep,
    guidance_token_weights,
    token_level_advantages,
)
from grouprl_core.groups import contiguous_group_ids
from grouprl_core.losses import clipped_surrogate_loss, importance_ratio

from ._compat import pad_rows, policy_forward, scoring_context, text_tokenizer, tokenize_prompts
from .base import GroupRLConfigMixin, GroupRLTrainer, unsupported_grpo_fields
from .base import card_paper, check_choice, check_dual_clip, choice_field, dual_clip_field
from .credit_map import write_credit_map

WEIGHTS_FROM = ("current", "old_policy")
# batch keys of the credit map: (B,) reward and group id per row, 0-dim step number (-1: no page)
CREDIT_REWARD, CREDIT_GROUP, CREDIT_STEP = "guidance_reward", "guidance_group", "guidance_credit_step"
__all__ = ["EMPTY_PROMPT", "WRONG_ANSWER_SUFFIX", "GuidanceGCPOConfig", "GuidanceGCPOTrainer"]


# ----------------------------------------------------------------------------- config
@dataclass
class GuidanceGCPOConfig(GroupRLConfigMixin, GRPOConfig):
    r"""Configuration for :class:`GuidanceGCPOTrainer`: every ``GRPOConfig`` field plus the fields below.

    Defaults follow the official code: clip 0.2 / 0.28, dual clip 3, token-mean (``loss_type="dapo"``),
    no KL (``beta=0``), dynamic filter on.
    """

    epsilon_high: float | None = field(
        default=DEFAULT_CLIP_HIGH, metadata={"help": "Upper clip range (DAPO clip-higher); the lower one is `epsilon` (0.2)."}
    )
    dual_clip: float | None = dual_clip_field(DEFAULT_DUAL_CLIP)
    rank_x: float = field(
        default=DEFAULT_RANK_X, metadata={"help": "Rank weights: the top rank_x of tokens (by divergence) carry rank_y of the weight."}
    )
    rank_y: float = field(default=DEFAULT_RANK_Y, metadata={"help": "Rank weights: weight mass of the top rank_x tokens."})
    weights_from: str = choice_field(
        "current", WEIGHTS_FROM,
        "'current': score both contexts with the current policy in every micro-batch (official code). "
        "'old_policy': once per generation batch with the generating policy (cheaper, a deviation).",
    )
    entropy_penalty_coef: float = field(
        default=0.0,
        metadata={"help": "Adds coef * mean(-log pi(o_t)) over valid tokens (official scripts: 0.02 / 0.16)."},
    )
    dynamic_filter: bool = field(
        default=True,
        metadata={"help": "Drop groups whose mean accuracy is <= 0.01 or >= 0.99 before the update (DAPO)."},
    )
    accuracy_reward: str | None = field(
        default=None,
        metadata={
            "help": "Name of the reward function whose value (a correctness score in [0, 1]) is the 'accuracy' "
            "the dynamic filter reads; None: the only reward function (with several, name one)."
        },
    )
    negative_prompt_type: str = choice_field(
        "wrong_answer", NEGATIVE_PROMPT_TYPES,
        "Negative context: 'wrong_answer' (prompt + 'Note: Intentionally generate an incorrect answer.'), "
        "'empty_prompt' ('answer the question', no question) or 'custom' (negative_template).",
    )
    negative_template: str | None = field(
        default=None,
        metadata={"help": "Format string with {prompt} for negative_prompt_type='custom'."},
    )
    credit_map_every: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps write output_dir/credit_maps/step_*.html (tokens coloured by "
                          "weight); 0 disables."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("rank_x", "rank_y"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if self.rank_y < self.rank_x:
            raise ValueError(
                f"rank_y={self.rank_y} < rank_x={self.rank_x}: the weights would favour low-divergence tokens. "
                "Use rank_y >= rank_x (rank_y == rank_x gives uniform weights)."
            )
        check_choice("weights_from", self.weights_from, WEIGHTS_FROM)
        if not math.isfinite(self.entropy_penalty_coef):
            raise ValueError(f"entropy_penalty_coef must be a finite number, got {self.entropy_penalty_coef!r}")
        check_choice("negative_prompt_type", self.negative_prompt_type, NEGATIVE_PROMPT_TYPES)
        if self.negative_prompt_type == "custom":
            if not self.negative_template:
                raise ValueError("negative_prompt_type='custom' needs negative_template, a format string with {prompt}")
            try:
                self.negative_template.format(prompt="x")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"negative_template {self.negative_template!r} is not a format string whose only field is "
                    f"{{prompt}}: {err!r}"
                ) from err
        elif self.negative_template is not None:
            raise ValueError(
                f"negative_template is only used with negative_prompt_type='custom' "
                f"(negative_prompt_type={self.negative_prompt_type!r})"
            )
        if not isinstance(self.credit_map_every, int) or self.credit_map_every < 0:
            raise ValueError(f"credit_map_every must be an integer >= 0, got {self.credit_map_every!r}")
        check_dual_clip(self.dual_clip)
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high!r}")
        if self.loss_type != "dapo":
            raise ValueError(
                f"loss_type={self.loss_type!r}: GuidanceGCPOTrainer uses the DAPO token-mean loss; set loss_type='dapo'"
            )
        if self.beta != 0.0:
            raise ValueError(f"beta={self.beta}: GCPO-guidance has no KL term; set beta=0.0")
        self.reject_unused_grpo_fields()

    UNUSED_GRPO_FIELDS = unsupported_grpo_fields("GuidanceGCPOTrainer", entropy_hint="use entropy_penalty_coef")


# ----------------------------------------------------------------------------- trainer
def _select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """``batch`` restricted to ``rows`` (tensors with a batch dim and per-row lists); 0-dim values kept."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in rows.tolist()]
        else:
            out[key] = value
    return out


class GuidanceGCPOTrainer(GroupRLTrainer):
    """GCPO-guidance (guidance-contrastive token credit) on top of TRL's ``GRPOTrainer`` (same constructor)."""

    config_class = GuidanceGCPOConfig
    algorithm_name = "GCPO-guidance"
    paper = card_paper("guidance")
    skip_key = "guidance_skip"
    skip_reason = (
        "the dynamic filter dropped every group (no group's mean accuracy is strictly between 0.01 and 0.99: "
        "every prompt was solved by all or by none of its completions). Check that accuracy_reward is a 0/1 "
        "correctness reward, use prompts the model solves sometimes, or set dynamic_filter=False"
    )

    def init_algorithm(self):
        if self.args.dynamic_filter:
            self._accuracy_column = self._accuracy_reward_index()
        self._credit_rows: list[dict] = []  # this process's rows of the credit-map batch being collected
        self._credit_micro_batches = 0
        self._credit_maps_written: set[int] = set()

    def _accuracy_reward_index(self) -> int:
        """Column of the reward the dynamic filter reads (``accuracy_reward``, or the only function)."""
        names_ = list(self.reward_func_names)
        name = self.args.accuracy_reward
        if name is None:
            if len(names_) > 1:
                raise ValueError(
                    f"accuracy_reward is not set and there are {len(names_)} reward functions {names_}: the dynamic "
                    "filter needs a correctness score in [0, 1] (the official filter reads the 'accuracy' field). "
                    "Set accuracy_reward to the name of the 0/1 correctness reward, or dynamic_filter=False."
                )
            index = 0
        elif name not in names_:
            raise ValueError(f"accuracy_reward={name!r} is not one of the reward functions {names_}")
        else:
            index = names_.index(name)
        if isinstance(self.reward_funcs[index], torch.nn.Module):
            raise ValueError(
                f"the dynamic filter would read the reward model {names_[index]!r} as accuracy, but its scores are "
                "not a correctness score in [0, 1] (every group would be dropped). Add a 0/1 correctness reward "
                "function and name it in accuracy_reward, or set dynamic_filter=False."
            )
        return index

    # ------------------------------------------------------------------ generation side
    def _negative_prompt_tensors(self, inputs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(neg_prompt_ids, neg_prompt_mask)`` for the dataset rows, tokenised like TRL's prompts."""
        if any(("image" in x or "images" in x) for x in inputs):
            raise NotImplementedError("GuidanceGCPOTrainer supports text-only prompts (no image/images column)")
        prompts = [x["prompt"] for x in inputs]

        def negatives(ps):
            return [build_negative_prompt(p, self.args.negative_prompt_type, self.args.negative_template) for p in ps]

        if self.environment_factories is None:  # each prompt comes num_generations times: tokenise it once
            keys = [repr(p) for p in prompts]
            distinct = dict(zip(keys, prompts))
            ids_of = dict(zip(distinct, tokenize_prompts(self, negatives(distinct.values())), strict=True))
            ids_list = [ids_of[k] for k in keys]
        else:  # per-row tool schemas (TRL renders row by row)
            ids_list = tokenize_prompts(self, negatives(prompts))
        device = self.accelerator.device
        ids = [torch.tensor(row) for row in ids_list]
        masks = [torch.ones_like(t, dtype=torch.long) for t in ids]
        ids = pad_rows(ids, text_tokenizer(self).pad_token_id, "left", self.pad_to_multiple_of)
        masks = pad_rows(masks, 0, "left", self.pad_to_multiple_of)
        return ids.to(device), masks.to(device)

    def _accuracy(self) -> torch.Tensor:
        """Gathered ``(N_global,)`` accuracy of the last scored batch (NaN counts as 0), checked to lie in [0, 1]."""
        column = self._accuracy_column
        accuracy = torch.nan_to_num(self._last_rewards_per_func[:, column], nan=0.0)
        outside = (accuracy < 0.0) | (accuracy > 1.0)
        if outside.any():
            name = self.reward_func_names[column]
            source = f"accuracy_reward={name!r}" if self.args.accuracy_reward else f"the only reward function {name!r}"
            raise ValueError(
                f"the dynamic filter reads {source} as accuracy and keeps groups whose mean accuracy is strictly "
                f"between {FILTER_LOW} and {FILTER_HIGH}, but {int(outside.sum())} of {accuracy.numel()} values lie "
                f"outside [0, 1] (e.g. {float(accuracy[outside][0]):g}); every group would be dropped. Set "
                "accuracy_reward to a reward function returning 1.0 for a correct and 0.0 for a wrong completion "
                "(add one if needed), or dynamic_filter=False."
            )
        return accuracy

    def assemble_batch(self, inputs):
        """TRL's batch, then the negative prompts, the credit-map columns, the dynamic filter (train only)
        and, with ``weights_from="old_policy"``, the token weights."""
        batch = super().assemble_batch(inputs)
        batch["neg_prompt_ids"], batch["neg_prompt_mask"] = self._negative_prompt_tensors(inputs)
        mode = self.mode
        if mode == "train" and self.args.credit_map_every > 0:
            self._add_credit_map_columns(batch)
        if mode == "train" and self.args.dynamic_filter:
            batch = self._dynamic_filter(batch, self._accuracy())
        if self.args.weights_from == "old_policy" and not bool(batch.get(self.skip_key, False)):
            self._old_policy_weights(batch, mode)
        return batch

    def _dynamic_filter(self, batch: dict, accuracy: torch.Tensor) -> dict:
        """Remove this process's rows whose group mean accuracy is <= 0.01 or >= 0.99.

        ``accuracy`` is gathered over all processes (groups may straddle them). Each process
        keeps a multiple of ``steps_per_generation`` rows (at least that many, so no micro-batch
        is empty), filling up with removed rows whose completion mask and advantage are zeroed.
        ``num_items_in_batch`` is recounted over the kept tokens; ``guidance_skip`` is set when
        no group is kept on any process.
        """
        n = batch["completion_ids"].size(0)
        group_ids = contiguous_group_ids(accuracy.numel(), self.num_generations, device=accuracy.device)
        keep_global = dynamic_filter_keep(accuracy, group_ids, FILTER_LOW, FILTER_HIGH)
        keep = self.local_rows(keep_global, n).to(batch["completion_ids"].device)

        chunks = self.args.steps_per_generation
        kept_rows = keep.nonzero().flatten()
        dropped_rows = (~keep).nonzero().flatten()
        target = max(chunks, math.ceil(kept_rows.numel() / chunks) * chunks)
        fillers = dropped_rows[: target - kept_rows.numel()]
        out = _select_rows(batch, torch.cat([kept_rows, fillers]))
        is_filler = torch.arange(target, device=keep.device) >= kept_rows.numel()
        out["completion_mask"] = out["completion_mask"] * (~is_filler).unsqueeze(1).to(out["completion_mask"].dtype)
        out["advantages"] = out["advantages"].masked_fill(is_filler, 0.0)

        self.recount_items(out)
        kept_total = int(keep_global.sum().item())
        out[self.skip_key] = torch.tensor(kept_total == 0, device=keep.device)
        self.record_metric(names.GUIDANCE_KEPT_FRAC, kept_total / keep_global.numel(), "train")
        self.record_metric(names.GUIDANCE_SKIPPED_STEP, float(kept_total == 0), "train")
        return out

    def _old_policy_weights(self, batch: dict, mode: str) -> None:
        """``weights_from="old_policy"``: weights from no-grad passes of the generating policy, once per batch."""
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        logp_pos = batch.get("old_per_token_logps")
        if logp_pos is None:
            with scoring_context(self):
                logp_pos = policy_forward(self, self.model, batch, batch_size=batch_size).logps
        logp_neg = self._negative_logps(self.model, batch, batch_size=batch_size)
        mask = self.loss_mask(batch)
        batch["guidance_weights"], batch["guidance_divergence"] = self._token_weights(logp_pos, logp_neg, mask, mode)

    # ------------------------------------------------------------------ weights
    def _negative_logps(self, model, inputs: dict, batch_size: int | None = None) -> torch.Tensor:
        """(B, T) no-grad log-probs of the completion tokens under the negative context."""
        with scoring_context(self):
            prompt = (inputs["neg_prompt_ids"], inputs["neg_prompt_mask"])
            return policy_forward(self, model, inputs, prompt=prompt, batch_size=batch_size).logps

    def _token_weights(self, logp_pos, logp_neg, mask, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank weights and k3 divergence (both (B, T), float32, detached) + their metrics."""
        weights, divergence = guidance_token_weights(
            logp_pos.detach().float(), logp_neg.detach().float(), mask, self.args.rank_x, self.args.rank_y
        )
        m = mask.to(torch.float32)
        local_max = (weights * m).max() if m.numel() > 0 else weights.new_zeros(())
        self.record_metric(names.GUIDANCE_WEIGHT_MAX, self.accelerator.gather(local_max).max().item(), mode)
        self.record_metric(names.GUIDANCE_DIVERGENCE_MEAN, self.global_masked_mean(divergence, mask), mode)
        return weights, divergence

    # ------------------------------------------------------------------ loss
    def algorithm_loss(self, model, inputs):
        """Clipped surrogate on ``A_it = A_i * w_it`` (clip-higher, dual clip), DAPO token-mean, optional
        entropy penalty; the loss tail (vLLM correction, MoE aux loss, scaling) is the base's.

        With ``weights_from="current"`` the negative context is scored first (no grad), then the
        policy forward runs once and its detached log-probs are the positive scores.
        """
        mask = self.loss_mask(inputs)
        logp_neg = self._negative_logps(model, inputs) if "guidance_weights" not in inputs else None
        out = self.forward_policy(model, inputs)
        if logp_neg is None:
            weights, divergence = inputs["guidance_weights"], inputs["guidance_divergence"]
        else:
            weights, divergence = self._token_weights(out.logps, logp_neg, mask, self.mode)
        advantages = token_level_advantages(inputs["advantages"], weights.to(out.logps.dtype))
        ratio = importance_ratio(out.logps, self.old_logps(inputs, out.logps), mask, self.importance_sampling_level)
        per_token_loss = clipped_surrogate_loss(
            ratio, advantages, self.epsilon_low, self.epsilon_high, dual_clip=self.args.dual_clip
        )
        coef = self.args.entropy_penalty_coef
        penalty = coef * (-out.logps) if coef != 0.0 else None
        self.log_clip_metrics(ratio, mask, advantages)
        loss = self.finish_loss(per_token_loss, inputs, out, agg="token-mean", ratio=ratio, extra=penalty)
        if self.mode == "train" and int(inputs.get(CREDIT_STEP, -1)) >= 0:
            self._collect_credit_map(inputs, weights, divergence, mask)
        return loss

    # ------------------------------------------------------------------ credit maps
    def _add_credit_map_columns(self, batch: dict) -> None:
        """Each row's weighted reward and group id as ``(B,)`` tensors, so they follow the rows through the
        filter and TRL's shuffle and split; the page's step number (0-dim; -1 when no page is due)."""
        n = batch["completion_ids"].size(0)
        device = batch["completion_ids"].device
        rewards = self.weighted_rewards(self._last_rewards_per_func)
        batch[CREDIT_REWARD] = self.local_rows(rewards, n).to(device=device, dtype=torch.float32)
        rows = torch.arange(n, device=device) + self.accelerator.process_index * n
        batch[CREDIT_GROUP] = rows // self.num_generations
        step = self.state.global_step + 1  # the step of this batch's first update, as the logs number it
        due = step % self.args.credit_map_every == 0 and step not in self._credit_maps_written
        batch[CREDIT_STEP] = torch.tensor(step if due else -1, device=device)

    def _collect_credit_map(self, inputs, weights, divergence, mask) -> None:
        """Keep this micro-batch's rows; after the generation batch's last micro-batch, gather every
        process's rows and write the page (main process). Every process calls this at the same
        micro-batches, so the gather lines up."""
        step = int(inputs[CREDIT_STEP])
        if step in self._credit_maps_written:  # num_iterations > 1: the batch is trained again
            return
        tok = text_tokenizer(self)
        for i in range(mask.size(0)):
            valid = mask[i].bool()
            if not valid.any():  # a filler row of the dynamic filter
                continue
            prompt_ids = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
            self._credit_rows.append({
                "completion": [tok.decode([t]) for t in inputs["completion_ids"][i][valid].tolist()],
                "weights": weights[i][valid].float().tolist(),
                "divergences": divergence[i][valid].float().tolist(),
                "reward": float(inputs[CREDIT_REWARD][i]),
                "advantage": float(inputs["advantages"][i]),
                "group": int(inputs[CREDIT_GROUP][i]),
                "prompt": tok.decode(prompt_ids, skip_special_tokens=True),
            })
        self._credit_micro_batches += 1
        if self._credit_micro_batches < self.args.steps_per_generation:
            return
        rows = gather_object(self._credit_rows)
        self._credit_rows, self._credit_micro_batches = [], 0
        self._credit_maps_written.add(step)
        if self.accelerator.is_main_process:
            write_credit_map(
                Path(self.args.output_dir) / "credit_maps", step,
                completions=[r["completion"] for r in rows], weights=[r["weights"] for r in rows],
                divergences=[r["divergences"] for r in rows], rewards=[r["reward"] for r in rows],
                advantages=[r["advantage"] for r in rows], group_ids=[r["group"] for r in rows],
                prompts=[r["prompt"] for r in rows],
            )
