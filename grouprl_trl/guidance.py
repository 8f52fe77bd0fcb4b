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
  is the weighted total reward, or the reward function named by ``accuracy_reward``; a reward
  of None/NaN from one function counts as 0 (a completion no function scored, or an inf
  reward, is an error). When no group survives on any process the optimizer step is
  skipped for real (no backward graph, so AdamW moves nothing; the step still counts for
  ``global_step`` and the LR schedule).

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
``credit_map_every=N`` writes an HTML page of a few completions with tokens coloured by their
weight to ``output_dir/credit_maps/`` every N optimizer steps.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
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

WEIGHTS_FROM = ("current", "old_policy")
CREDIT_MAP_ROWS = 4
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
    dual_clip: float | None = field(
        default=DEFAULT_DUAL_CLIP,
        metadata={"help": "Dual-clip constant c > 1: for A < 0 the per-token loss is capped at -c*A. None disables."},
    )
    rank_x: float = field(
        default=DEFAULT_RANK_X, metadata={"help": "Rank weights: the top rank_x of tokens (by divergence) carry rank_y of the weight."}
    )
    rank_y: float = field(default=DEFAULT_RANK_Y, metadata={"help": "Rank weights: weight mass of the top rank_x tokens."})
    weights_from: str = field(
        default="current",
        metadata={
            "help": "'current': score both contexts with the current policy in every micro-batch (official code). "
            "'old_policy': once per generation batch with the generating policy (cheaper, a deviation).",
            "choices": list(WEIGHTS_FROM),
        },
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
            "help": "Name of the reward function whose value is the 'accuracy' of the dynamic filter; "
            "None uses the weighted total reward."
        },
    )
    negative_prompt_type: str = field(
        default="wrong_answer",
        metadata={
            "help": "Negative context: 'wrong_answer' (prompt + 'Note: Intentionally generate an incorrect answer.'), "
            "'empty_prompt' ('answer the question', no question) or 'custom' (negative_template).",
            "choices": list(NEGATIVE_PROMPT_TYPES),
        },
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
        if self.weights_from not in WEIGHTS_FROM:
            raise ValueError(f"weights_from must be one of {WEIGHTS_FROM}, got {self.weights_from!r}")
        if not math.isfinite(self.entropy_penalty_coef):
            raise ValueError(f"entropy_penalty_coef must be a finite number, got {self.entropy_penalty_coef!r}")
        if self.negative_prompt_type not in NEGATIVE_PROMPT_TYPES:
            raise ValueError(
                f"negative_prompt_type must be one of {NEGATIVE_PROMPT_TYPES}, got {self.negative_prompt_type!r}"
            )
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
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip!r}")
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
    paper = {"title": "Guidance Contrastive Token Credit Assignment for Discrete Policy Optimization", "id": "2605.29198"}
    skip_key = "guidance_skip"

    def init_algorithm(self):
        accuracy_reward = self.args.accuracy_reward
        if accuracy_reward is not None and accuracy_reward not in self.reward_func_names:
            raise ValueError(
                f"accuracy_reward={accuracy_reward!r} is not one of the reward functions {self.reward_func_names}"
            )
        self._last_credit_map_step = -1

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
        """Gathered ``(N_global,)`` accuracy of the last scored batch (NaN counts as 0)."""
        rpf = self._last_rewards_per_func
        if self.args.accuracy_reward is not None:
            accuracy = rpf[:, self.reward_func_names.index(self.args.accuracy_reward)]
        else:
            accuracy = self.weighted_rewards(rpf)
        return torch.nan_to_num(accuracy, nan=0.0)

    def assemble_batch(self, inputs):
        """TRL's batch, then the negative prompts, the dynamic filter (train only) and, with
        ``weights_from="old_policy"``, the token weights."""
        batch = super().assemble_batch(inputs)
        batch["neg_prompt_ids"], batch["neg_prompt_mask"] = self._negative_prompt_tensors(inputs)
        mode = self.mode
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
        if self.mode == "train" and self.args.credit_map_every > 0:
            self._maybe_write_credit_map(inputs, weights, divergence, mask)
        return loss

    # ------------------------------------------------------------------ credit maps
    def _maybe_write_credit_map(self, inputs, weights, divergence, mask):
        step = self.state.global_step
        if step % self.args.credit_map_every != 0 or step == self._last_credit_map_step:
            return
        self._last_credit_map_step = step
        if not self.accelerator.is_main_process:
            return
        path = Path(self.args.output_dir) / "credit_maps" / f"step_{step:06d}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._credit_map_html(inputs, weights, divergence, mask, step), encoding="utf-8")

    def _credit_map_html(self, inputs, weights, divergence, mask, step: int) -> str:
        """A small HTML page: a few completions, each token's background as dark as its weight."""
        tok = text_tokenizer(self)
        rows = [i for i in range(mask.size(0)) if mask[i].any()][:CREDIT_MAP_ROWS]
        parts = [
            "<!doctype html><meta charset='utf-8'><title>GCPO-guidance credit map</title>",
            "<style>body{font-family:monospace} span{padding:1px;margin:1px;border-radius:3px}</style>",
            f"<h3>GCPO-guidance token credit, step {step}</h3>",
            "<p>Background = token weight w (mean 1 per completion; darker = more credit). "
            "Hover for w and the k3 divergence d.</p>",
        ]
        for i in rows:
            valid = mask[i].bool()
            w, d = weights[i][valid].float().tolist(), divergence[i][valid].float().tolist()
            ids = inputs["completion_ids"][i][valid].tolist()
            prompt = tok.decode(inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist())
            top = max(w) if w else 1.0
            spans = []
            for token_id, wi, di in zip(ids, w, d, strict=True):
                alpha = 0.05 + 0.85 * wi / top if top > 0 else 0.05
                text = html.escape(tok.decode([token_id])).replace("\n", "&#8629;") or "&#9251;"
                spans.append(
                    f"<span style='background:rgba(220,40,40,{alpha:.2f})' title='w={wi:.3f} d={di:.4f}'>{text}</span>"
                )
            parts.append(
                f"<p><b>A = {float(inputs['advantages'][i]):+.3f}</b> &nbsp; prompt: {html.escape(prompt)}<br>"
                + "".join(spans)
                + "</p>"
            )
        return "\n".join(parts)
