"""GCPO-gold for TRL: ``GCPOTrainer`` / ``GCPOConfig``, drop-in replacements for ``GRPOTrainer`` /
``GRPOConfig``.

Paper: Wu & Liu, "Group Contrastive Policy Optimization: When Contrast Fails, Go Gold"
(arXiv 2510.07790). No official code is public: this implements our reading of the paper, written
down in ``docs/algorithms.md`` (GCPO-gold) as a proposal. The planning math lives in
:mod:`grouprl_core.gold`, the advantage in :mod:`grouprl_core.grpo`; this module moves TRL's lists
and tensors in and out.

What changes compared with GRPO (training only; evaluation rollouts are left as sampled):

- a group is *all wrong* when no member's reward reaches ``correct_threshold`` (the reward is
  TRL's weighted sum over the reward functions; every completion needs a finite reward, as in
  every grouprl trainer). With ``gold_trigger="all_wrong"`` such a group, if its row has a reference solution
  (column ``reference_column``, non-empty), receives the gold completion
  ``gold_template.format(solution=reference)``;
- ``gold_placement="replace"`` (default): the gold completion replaces the group's last
  rollout. The injection happens in ``_generate``, i.e. before TRL builds the tensors, so the
  gold row goes through TRL's normal path: the old-log-prob pass, the reference pass (when
  ``beta > 0``), the reward functions (the gold is scored, never assumed correct) and TRL's group
  advantage ``A = (r - mean_g) / (std_g + 1e-4)`` over the batch that already holds it;
  rendering and the empty-reference rule are :func:`grouprl_core.gold.render_gold`'s;
- ``gold_placement="append"``: the gold completion joins the group as member G+1. TRL's
  advantage code reshapes rewards by ``num_generations`` and needs equal row counts on every
  process, so appending cannot go through it. Instead, after TRL has scored the G rollouts,
  the gold rows are built here (same prompt tokens, old/reference log-probs from the same
  ``_get_per_token_logps_and_entropies`` TRL uses, rewards from the same reward functions),
  and the advantages of the whole batch are recomputed from explicit group ids with
  :func:`grouprl_core.grpo.grpo_advantages` (``(r - mean_g) / (std_g + 1e-4)``, groups of G
  or G+1). The process that holds a group's last member gets its gold row; every process then
  holds the same number of rows (TRL's loss and metrics gather per-row tensors across
  processes), the processes with fewer gold rows padding with filler rows whose loss mask and
  advantage are 0 (not in the completions table, not counted by any normaliser). The loss is
  written here for "append" (TRL's clipped ratio, token or sequence level, KL, vLLM correction,
  MoE aux loss) so that fillers carry no weight: ``loss_type="grpo"`` averages sequences over the
  whole generation batch of all processes, ``"dapo"`` averages tokens the same way (other loss
  types are refused with "append"). Micro-batches are split with sizes differing by at most one row;
- the gold tokens are ``tokenizer(text, add_special_tokens=False)`` plus EOS, or, when that is
  longer than ``max_completion_length``, the first ``max_completion_length`` tokens without EOS
  (exactly what a cut-off sampled completion looks like; ``mask_truncated_completions`` then
  treats it like one). The reward functions see the decoded kept tokens;
- loss: TRL's, with ``importance_sampling_level="sequence"`` + ``loss_type="grpo"`` (GSPO's
  clipped sequence ratio ``s_i = exp(mean_t(log pi_theta - log pi_old))``, sequences weighted
  equally) and ``beta=0`` (no KL) as defaults. ``importance_sampling_level="token"`` gives the
  token-level GRPO clip.

vLLM: the gold tokens were not sampled by vLLM, so they have no sampling log-probs. Their
entries are ``None``, which TRL (1.14.2-1.16) turns into NaN and neutralises: the
importance-sampling correction of a NaN token is exactly 1 (token modes) / contributes 0 to the
sequence sum (sequence modes), and the off-policy mask ignores it. So gold tokens get no vLLM
correction. Appended gold
rows get ``importance_sampling_ratio = 1`` and NaN ``sampling_per_token_logps`` directly.

Cost: with ``"replace"``, the rollouts are scored before injection (to decide the trigger) and
the batch is scored again when something was injected (reward functions run twice on such
batches; rows that were not replaced keep their first score, so the trigger and the final
rewards agree). With ``"append"`` only the gold rows are scored a second time.

Metrics (global over processes): ``gold/injected_frac`` (groups that got a gold member /
groups), ``gold/sampled_reward_mean`` (mean weighted reward of the rollouts as sampled, before
any injection: the policy's reward, comparable with GRPO's ``reward``), and, on batches with an
injection, ``gold/reward_mean`` (mean weighted reward of the gold completions),
``gold/truncated_frac`` (gold completions cut at ``max_completion_length``) and
``gold/below_threshold_frac`` (gold completions scoring below ``correct_threshold``: their group
still has no correct member). The first gold completion that scores below the threshold also
logs a warning naming the likely cause (cut at ``max_completion_length``, ``gold_template``, or a
reward function that does not parse it) and the field to change. TRL's own reward
metrics describe the scored batch: with ``"replace"`` it holds the gold completions (so TRL's
``reward`` is inflated by them), with ``"append"`` the G sampled rollouts only.

The completions table (``log_completions``) shows the rows the update uses with their
advantages: with ``"append"`` the recomputed ones, and the gold rows as extra rows.

Not supported with ``"append"``: tools / environments and multimodal rows (clear errors).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, is_conversational

from grouprl_core import names
from grouprl_core.gold import (
    DEFAULT_CORRECT_THRESHOLD,
    DEFAULT_GOLD_TEMPLATE,
    PLACEMENTS,
    TRIGGERS,
    check_gold_template,
    fit_gold_completion,
    plan_gold_injection,
    render_gold,
)
from grouprl_core.groups import contiguous_group_ids
from grouprl_core.grpo import GRPO_STD_EPS, grpo_advantages
from grouprl_core.losses import aggregate_token_loss, clipped_surrogate_loss, importance_ratio

from ._compat import (
    MULTIMODAL_KEYS,
    buffered_micro_batch,
    drop_pending_reward_logs,
    policy_forward,
    reference_adapter,
    scoring_context,
    shuffle_rows,
    text_tokenizer,
)
from .base import LOGGED_ROWS, GroupRLTrainer, card_paper, check_choice, choice_field, unsupported_grpo_fields
from .batching import batch_size_of, select_and_concat, split_rows_evenly

__all__ = ["DEFAULT_GOLD_TEMPLATE", "GCPOConfig", "GCPOTrainer", "render_gold"]

logger = logging.getLogger(__name__)

GSPO_EPSILON, GSPO_EPSILON_HIGH = 3e-4, 4e-4  # GSPO's sequence-ratio clip range
TRL_EPSILON = 0.2  # GRPOConfig's default for the token ratio
# "append": loss_type -> aggregation of the loss written here (both normalised over the generation batch)
APPEND_AGGREGATION = {"grpo": "seq-mean-token-mean", "dapo": "token-mean"}
APPEND_UNSUPPORTED = unsupported_grpo_fields("GCPOTrainer with gold_placement='append'")
NUM_SEQS = "gold_num_sequences"  # batch key ("append"): sequences with a loss token, all processes


@dataclass
class GCPOConfig(GRPOConfig):
    r"""Configuration for :class:`GCPOTrainer` (GCPO-gold, a proposal: no official code): every
    ``GRPOConfig`` field plus the fields below. Defaults changed from GRPO:
    ``importance_sampling_level="sequence"`` and ``loss_type="grpo"`` (GSPO: one clipped ratio
    ``s_i = exp(mean_t(log pi_theta - log pi_old))`` per sequence, sequences weighted equally) and
    ``beta=0.0`` (no KL, no reference model). The clip range follows the ratio: with the sequence
    ratio ``epsilon`` / ``epsilon_high`` default to GSPO's 3e-4 / 4e-4 (Zheng et al., arXiv
    2507.18071; also grouprl_verl's ``grouprl_gcpo`` config), with ``importance_sampling_level="token"``
    to TRL's 0.2 / 0.2. Values set explicitly are kept.
    """

    reference_column: str = field(
        default="solution",
        metadata={"help": "Dataset column with each row's reference solution; an empty value means no gold."},
    )
    gold_trigger: str = choice_field(
        "all_wrong", TRIGGERS,
        "When a group gets the gold completion: 'all_wrong' (no reward reaches correct_threshold), "
        "'always', or 'never' (plain GRPO/GSPO).",
    )
    gold_placement: str = choice_field(
        "replace", PLACEMENTS, "'replace' the group's last rollout, or 'append' the gold as member G+1.")
    gold_template: str = field(
        default=DEFAULT_GOLD_TEMPLATE,
        metadata={
            "help": "Python format string rendering a reference solution as a completion the reward functions can "
            "score; '{solution}' is the reference, literal braces are doubled. Default: "
            "'<think>\\n{solution}\\n</think>\\n\\\\boxed{{{solution}}}' (for an answer-only reference column); use "
            "'{solution}' when the column already is a full completion."
        },
    )
    correct_threshold: float = field(
        default=DEFAULT_CORRECT_THRESHOLD,
        metadata={"help": "A rollout is correct when its (weighted, summed) reward is >= this; decides 'all_wrong'."},
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "TRL loss aggregation; 'grpo' (per-sequence mean) with the sequence ratio is GSPO's objective."
        },
    )
    importance_sampling_level: str = field(
        default="sequence",
        metadata={"help": "'sequence' (GSPO sequence ratio, the GCPO default) or 'token' (GRPO token ratio)."},
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "KL coefficient; 0.0 (default) loads no reference model."},
    )
    epsilon: float | None = field(
        default=None,
        metadata={"help": "Lower clip range; None: 3e-4 with the sequence ratio (GSPO), 0.2 with the token ratio."},
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range; None: 4e-4 with the sequence ratio (GSPO), else equal to epsilon."},
    )

    def __post_init__(self):
        sequence_ratio = self.importance_sampling_level == "sequence"
        if self.epsilon is None:
            self.epsilon = GSPO_EPSILON if sequence_ratio else TRL_EPSILON
        if self.epsilon_high is None and sequence_ratio:
            self.epsilon_high = GSPO_EPSILON_HIGH  # token ratio: left None, GRPOTrainer then uses epsilon
        if not isinstance(self.reference_column, str) or not self.reference_column:
            raise ValueError(f"reference_column must be a non-empty column name, got {self.reference_column!r}")
        check_choice("gold_trigger", self.gold_trigger, TRIGGERS)
        check_choice("gold_placement", self.gold_placement, PLACEMENTS)
        check_gold_template(self.gold_template, "gold_template")
        self.correct_threshold = float(self.correct_threshold)
        if not math.isfinite(self.correct_threshold):
            raise ValueError(f"correct_threshold must be a finite number, got {self.correct_threshold}")
        if self.gold_placement == "append" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "gold_placement='append' recomputes advantages from the weighted reward sum; "
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} is not supported with it. "
                "Use multi_objective_aggregation='sum_then_normalize' or gold_placement='replace'."
            )
        if self.gold_placement == "append":
            if self.loss_type not in APPEND_AGGREGATION:
                raise ValueError(
                    f"loss_type={self.loss_type!r} is not supported with gold_placement='append' (its loss must give "
                    f"the filler rows that even out the processes no weight); use one of {list(APPEND_AGGREGATION)} "
                    "or gold_placement='replace'."
                )
            for name, (accepted, why) in APPEND_UNSUPPORTED.items():
                if getattr(self, name) not in accepted:
                    raise ValueError(f"{name}={getattr(self, name)!r}: {why}; leave it at {accepted[0]!r} or use "
                                     "gold_placement='replace'.")
        super().__post_init__()



class GCPOTrainer(GroupRLTrainer):
    """GCPO-gold on top of TRL's ``GRPOTrainer`` (same constructor). A proposal (no official code).

    When every rollout of a prompt is wrong, the prompt's reference solution joins the group
    (replacing its last rollout, or as member G+1), is scored by the same reward functions and
    the group advantages ``A = (r - mean_g) / (std_g + eps)`` are recomputed with it. See the
    module docstring for the TRL plumbing, vLLM handling and metrics. The loss is TRL's own.
    """

    config_class = GCPOConfig
    algorithm_name = "GCPO"
    paper = card_paper("gcpo_gold")

    def init_algorithm(self):
        args = self.args
        if args.gold_trigger != "never":
            _check_reference_column(self.train_dataset, args.reference_column)
        if args.gold_placement == "append" and (self.tools or self.environment_factories is not None):
            raise NotImplementedError(
                "gold_placement='append' does not support tools or environment_factory; use gold_placement='replace'."
            )
        self._gold_inputs: list[dict] | None = None  # dataset rows of the batch being generated (train only)
        self._gold_state: dict | None = None  # what generate_rollouts injected, read by score_completions
        self._warned_below_threshold = False

    # ------------------------------------------------------------------ helpers
    def _gold_tokens(self, reference) -> tuple[list[int], bool] | None:
        """Token ids of a row's gold completion (EOS / truncation as a sampled one) and whether it was cut."""
        text = render_gold(self.args.gold_template, reference)
        if text is None:
            return None
        tokenizer = text_tokenizer(self)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return fit_gold_completion(ids, tokenizer.eos_token_id, self.max_completion_length)

    def _gold_completion_text(self, ids: list[int], prompt):
        """What the reward functions see: the decoded kept tokens, shaped like TRL's completions."""
        text = text_tokenizer(self).decode(ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompt}):
            return [{"role": "assistant", "content": text}]
        return text

    def _plan(self, inputs: list[dict], rewards_per_func: torch.Tensor):
        """Global gold plan from the gathered rewards and each process's reference column."""
        rewards = self.weighted_rewards(rewards_per_func)
        correct = rewards >= self.args.correct_threshold
        col = self.args.reference_column
        has_gold_local = torch.tensor(
            [render_gold(self.args.gold_template, x.get(col)) is not None for x in inputs],
            dtype=torch.long,
            device=rewards.device,
        )
        has_gold = self.accelerator.gather(has_gold_local).bool()
        group_ids = contiguous_group_ids(rewards.numel(), self.num_generations, device=rewards.device)
        plan = plan_gold_injection(
            correct, group_ids, has_gold, trigger=self.args.gold_trigger, placement=self.args.gold_placement
        )
        return plan, rewards, group_ids

    def _local_rows(self, global_rows: torch.Tensor, num_local: int) -> list[int]:
        start = self.accelerator.process_index * num_local
        return [i - start for i in global_rows.tolist() if start <= i < start + num_local]

    def _log_gold(
        self, num_injected: int, num_groups: int, gold_rewards: torch.Tensor, num_truncated: int,
        sampled_rewards: torch.Tensor | None = None,
    ):
        self.record_metric(names.GOLD_INJECTED_FRAC, num_injected / num_groups, "train")
        if sampled_rewards is not None:  # the policy's own reward, comparable with GRPO's "reward"
            self.record_metric(names.GOLD_SAMPLED_REWARD_MEAN, sampled_rewards.float().mean().item(), "train")
        if num_injected > 0:
            below = gold_rewards < self.args.correct_threshold
            self.record_metric(names.GOLD_REWARD_MEAN, gold_rewards.float().mean().item(), "train")
            self.record_metric(names.GOLD_TRUNCATED_FRAC, num_truncated / num_injected, "train")
            self.record_metric(names.GOLD_BELOW_THRESHOLD_FRAC, below.float().mean().item(), "train")
            if below.any() and not self._warned_below_threshold:
                self._warned_below_threshold = True
                self._warn_below_threshold(int(below.sum()), num_injected, num_truncated, float(gold_rewards.min()))

    def _warn_below_threshold(self, num_below: int, num_injected: int, num_truncated: int, lowest: float) -> None:
        """Once per run: gold that does not count as correct leaves its group without contrast."""
        if not self.accelerator.is_main_process:
            return
        args = self.args
        if num_truncated:
            cause = (f"{num_truncated} of them were cut at max_completion_length={self.max_completion_length} "
                     f"(gold/truncated_frac {num_truncated / num_injected:g}): raise max_completion_length, or use "
                     "a shorter gold_template / reference_column")
        else:
            cause = "none was cut, so the reward functions do not accept the rendered gold"
        logger.warning(
            "GCPO-gold: %d of %d injected gold completions scored below correct_threshold=%g (lowest %g), so their "
            "groups still have no correct member and no signal. Likely cause: %s. Otherwise check that "
            "gold_template=%r renders a completion your reward functions score as correct from the column "
            "reference_column=%r (the default template expects a final answer there; use '{solution}' for a full "
            "worked completion), that the reward function parses it, and that correct_threshold fits the reward "
            "scale. Counted per step in %s; this warning is not repeated.",
            num_below, num_injected, args.correct_threshold, lowest, cause, args.gold_template,
            args.reference_column, names.GOLD_BELOW_THRESHOLD_FRAC,
        )

    # ------------------------------------------------------------------ hooks
    def assemble_batch(self, inputs):
        """TRL's batch; the batch's rows are stashed for :meth:`generate_rollouts` ("replace"); with
        "append" the gold rows and the recomputed advantages are added after it."""
        training = self.mode == "train"
        self._gold_inputs = inputs if training else None
        try:
            batch = super().assemble_batch(inputs)
        finally:
            self._gold_inputs = None
            self._gold_state = None
        if training and self.args.gold_placement == "append":
            batch = self._append_gold(inputs, batch)
            has_tokens = (self.loss_mask(batch).sum(-1) > 0).sum()
            batch[NUM_SEQS] = self.accelerator.gather(has_tokens).sum()
        return batch

    def generate_rollouts(self, prompts):
        """TRL's rollouts plus the "replace" injection.

        Runs before TRL turns the rollouts into tensors, so the old-log-prob, reference and
        reward passes all see the batch that already holds the gold completions.
        """
        rollouts = super().generate_rollouts(prompts)
        inputs = self._gold_inputs
        if inputs is None or self.args.gold_placement != "replace":
            return rollouts
        if len(rollouts.completion_ids) != len(inputs):
            raise RuntimeError(
                f"GCPO-gold expected one completion per dataset row ({len(inputs)}), got {len(rollouts.completion_ids)}"
            )
        num_groups = len(inputs) * self.accelerator.num_processes // self.num_generations
        if self.args.gold_trigger == "never":
            self._log_gold(0, num_groups, torch.zeros(0), 0)
            return rollouts

        # Score the sampled rollouts to decide the trigger (reward functions see the same kwargs as in TRL).
        score_inputs = _with_extra_fields(inputs, rollouts.extra_fields)
        rewards_per_func = self.score_completions(score_inputs, prompts, rollouts.completions, rollouts.completion_ids)
        plan, _, _ = self._plan(inputs, rewards_per_func)

        completion_ids, completions = list(rollouts.completion_ids), list(rollouts.completions)
        tool_mask = list(rollouts.tool_mask) if rollouts.tool_mask is not None else None
        logprobs = list(rollouts.logprobs) if rollouts.logprobs is not None else None
        num_truncated = 0
        for i in self._local_rows(plan.replace_index, len(inputs)):
            ids, truncated = self._gold_tokens(inputs[i].get(self.args.reference_column))
            num_truncated += int(truncated)
            completion_ids[i] = ids
            completions[i] = self._gold_completion_text(ids, prompts[i])
            if tool_mask is not None:
                tool_mask[i] = [1] * len(ids)  # every gold token is trained on
            if logprobs is not None:
                logprobs[i] = [None] * len(ids)  # not sampled: TRL maps None -> NaN -> no IS correction
        truncated_count = torch.tensor([num_truncated], device=self.accelerator.device)
        self._gold_state = {
            "rows": plan.replace_index.to(rewards_per_func.device),
            "scores": rewards_per_func,
            "num_groups": num_groups,
            "num_truncated": int(self.accelerator.gather(truncated_count).sum()),
        }
        return rollouts._replace(completion_ids=completion_ids, completions=completions, tool_mask=tool_mask,
                                 logprobs=logprobs)

    def score_completions(self, inputs, prompts, completions, completion_ids_list):
        """The base's scoring, reusing the pre-injection scores: only a batch with gold rows is scored
        again, and only its gold rows take the new scores."""
        state = self._gold_state
        if state is None:
            return super().score_completions(inputs, prompts, completions, completion_ids_list)
        self._gold_state = None  # consumed: TRL calls this once per batch
        rows = state["rows"]
        if rows.numel() == 0:
            result = state["scores"]
        else:
            # The pre-scoring pass's log_extra / log_metric entries described the replaced rollouts.
            drop_pending_reward_logs(self)
            fresh = self.checked_scores(inputs, prompts, completions, completion_ids_list)
            result = state["scores"].clone()
            result[rows] = fresh[rows]
        gold_rewards = self.weighted_rewards(result[rows])
        sampled = self.weighted_rewards(state["scores"])
        self._log_gold(rows.numel(), state["num_groups"], gold_rewards, state["num_truncated"], sampled)
        self._last_rewards_per_func = result
        return result

    # ------------------------------------------------------------------ "append"
    def _append_gold(self, inputs: list[dict], output: dict) -> dict:
        """Add each chosen group's gold completion as member G+1 and recompute all advantages.

        The gold rows get what TRL computes for sampled rows: old log-probs (when TRL computed
        them), reference log-probs (when ``beta > 0``), rewards from the same reward functions;
        then ``A = (r - mean_g) / (std_g + 1e-4)`` over explicit group ids (groups of G or G+1).
        """
        if any(output.get(k) is not None for k in MULTIMODAL_KEYS):
            raise NotImplementedError("gold_placement='append' does not support images; use gold_placement='replace'.")
        device = self.accelerator.device
        num_local = batch_size_of(output)
        num_global = num_local * self.accelerator.num_processes
        num_groups = num_global // self.num_generations
        if self.args.gold_trigger == "never":
            self._log_gold(0, num_groups, torch.zeros(0), 0)
            return output
        plan, rewards, group_ids = self._plan(inputs, self._last_rewards_per_func)
        anchors = self._local_rows(plan.anchor_index, num_local)
        counts = self.accelerator.gather(torch.tensor([len(anchors)], device=device)).tolist()
        max_count = max(counts)
        if max_count == 0:
            self._log_gold(0, num_groups, torch.zeros(0), 0, rewards)
            return output

        gold = [self._gold_tokens(inputs[a].get(self.args.reference_column)) for a in anchors]
        gold_ids = [ids for ids, _ in gold]
        num_truncated = sum(int(t) for _, t in gold)

        # Score the gold rows; every process sends max_count rows (padding repeats a real row,
        # its score is dropped) because the reward gather needs equal sizes.
        prompts = [inputs[a]["prompt"] for a in anchors]
        texts = [self._gold_completion_text(ids, p) for ids, p in zip(gold_ids, prompts)]
        pad_row = anchors[0] if anchors else 0
        pad_ids = gold_ids[0] if anchors else output["completion_ids"][0][output["completion_mask"][0].bool()].tolist()
        pad_ids = pad_ids or [text_tokenizer(self).eos_token_id]
        pad_text = texts[0] if anchors else self._gold_completion_text(pad_ids, inputs[0]["prompt"])
        n_pad = max_count - len(anchors)
        scores = self.checked_scores(
            [inputs[a] for a in anchors] + [inputs[pad_row]] * n_pad,
            prompts + [inputs[pad_row]["prompt"]] * n_pad,
            texts + [pad_text] * n_pad,
            gold_ids + [pad_ids] * n_pad,
        )
        # TRL flushed this batch's pending reward logs already; entries from this call have no row to go to.
        drop_pending_reward_logs(self)
        keep = torch.cat([torch.arange(p * max_count, p * max_count + c) for p, c in enumerate(counts)]).to(device)
        gold_scores = scores[keep]
        gold_rewards = self.weighted_rewards(gold_scores)
        total_truncated = int(self.accelerator.gather(torch.tensor([num_truncated], device=device)).sum())
        self._log_gold(plan.num_injected, num_groups, gold_rewards, total_truncated, rewards)

        all_rewards = torch.cat([rewards, gold_rewards])
        all_groups = torch.cat([group_ids, plan.groups.to(group_ids.device)])
        advantages = grpo_advantages(all_rewards, all_groups, scale=self.scale_rewards, eps=GRPO_STD_EPS)
        self.set_advantages(output, self.local_rows(advantages, num_local))
        # Every process adds max_count rows, so all hold the same number (TRL gathers per-row tensors in
        # its loss); the rows past this process's gold ones are fillers: loss mask 0, advantage 0, no table row.
        offset = num_global + sum(counts[: self.accelerator.process_index])
        local_scores = scores[self.accelerator.process_index * max_count :][: len(anchors)]
        logged = [
            {"prompt": p, "completion": t, "extra": {}, "rewards": dict(zip(self.reward_func_names, row.tolist()))}
            for p, t, row in zip(prompts, texts, local_scores)
        ]
        gold_batch = self._gold_rows(
            output, anchors + [pad_row] * n_pad, gold_ids + [pad_ids] * n_pad,
            [t for _, t in gold] + [False] * n_pad, logged + [None] * n_pad, num_real=len(anchors),
        )
        fill = torch.zeros(n_pad, device=device)
        self.set_advantages(gold_batch, torch.cat([advantages[offset : offset + len(anchors)].to(device), fill]))
        merged = select_and_concat(
            [(output, list(range(num_local))), (gold_batch, list(range(max_count)))], text_tokenizer(self).pad_token_id
        )
        self.recount_items(merged)  # fillers have no loss token: the global count is the real rows'
        return merged

    def _gold_rows(self, output: dict, anchors: list[int], gold_ids: list[list[int]], truncated: list[bool],
                   logged_rows: list[dict | None], num_real: int) -> dict:
        """TRL-shaped tensors for the appended gold rows (same keys as ``output``); rows from ``num_real`` on
        are fillers (loss mask 0)."""
        device = self.accelerator.device
        idx = torch.tensor(anchors, device=device)
        width = max(len(ids) for ids in gold_ids)
        pad_id = text_tokenizer(self).pad_token_id
        completion_ids = torch.full((len(anchors), width), pad_id, dtype=output["completion_ids"].dtype, device=device)
        completion_mask = torch.zeros((len(anchors), width), dtype=output["completion_mask"].dtype, device=device)
        for r, ids in enumerate(gold_ids):
            completion_ids[r, : len(ids)] = torch.tensor(ids, device=device)
            if r < num_real and not (self.mask_truncated_completions and truncated[r]):
                completion_mask[r, : len(ids)] = 1
        batch = {
            "prompt_ids": output["prompt_ids"][idx],
            "prompt_mask": output["prompt_mask"][idx],
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": output["advantages"][idx],  # replaced by the caller
            LOGGED_ROWS: logged_rows,
        }
        for key, value in output.items():
            if key in batch or value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
                continue
            if key == "old_per_token_logps":
                batch[key] = self._gold_logps(self.model, batch)
            elif key == "ref_per_token_logps":
                model, adapter = reference_adapter(self)
                with adapter:
                    batch[key] = self._gold_logps(model, batch)
            elif key == "importance_sampling_ratio":  # not sampled by vLLM: no correction
                batch[key] = torch.ones(len(anchors), 1 if value.size(1) == 1 else width, device=device)
            elif key == "sampling_per_token_logps":  # NaN = "no sampling log-prob", neutral in TRL
                batch[key] = torch.full((len(anchors), width), float("nan"), device=device)
            elif key == "tool_mask":
                batch[key] = torch.ones_like(completion_ids)
            else:
                raise NotImplementedError(f"gold_placement='append' cannot build batch field {key!r} for gold rows")
        return batch

    def _gold_logps(self, model, batch: dict) -> torch.Tensor:
        # The same call and no-grad / no-checkpointing context as TRL's old / reference log-prob passes.
        with scoring_context(self):
            return policy_forward(self, model, batch, batch_size=self.args.per_device_train_batch_size).logps

    # ------------------------------------------------------------------ "append" loss
    def algorithm_loss(self, model, inputs):
        """TRL's loss, except in "append" training: the same clipped ratio objective (token or sequence
        level, ``epsilon`` / ``epsilon_high``), KL, vLLM correction and aux loss through the base's loss
        tail, aggregated over the generation batch of all processes (:data:`APPEND_AGGREGATION`), so the
        filler rows weigh nothing and any split of rows over processes gives the same update."""
        if self.args.gold_placement != "append" or self.mode != "train":
            return super().algorithm_loss(model, inputs)
        mask = self.loss_mask(inputs)
        out = self.forward_policy(model, inputs)
        ratio = importance_ratio(out.logps, self.old_logps(inputs, out.logps), mask, self.importance_sampling_level)
        per_token_loss = clipped_surrogate_loss(ratio, inputs["advantages"], self.epsilon_low, self.epsilon_high)
        self.log_clip_metrics(ratio, mask, inputs["advantages"])
        return self.finish_loss(per_token_loss, inputs, out, agg=APPEND_AGGREGATION[self.loss_type], ratio=ratio)

    def aggregate_loss(self, per_token_loss, mask, inputs, agg):
        """Sequence mean with a global normaliser (as the base's token mean): the sequences with a loss token
        in the generation batch of all processes, rescaled to one accumulation window of one process."""
        if agg != "seq-mean-token-mean" or NUM_SEQS not in inputs:
            return super().aggregate_loss(per_token_loss, mask, inputs, agg)
        total = inputs[NUM_SEQS].clamp(min=1.0) / self.accelerator.num_processes
        total = total * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return aggregate_token_loss(per_token_loss, mask, agg, total_seqs=total)

    def next_micro_batch(self, generation_batch):
        """TRL's buffering, but for "append" the generation batch may not divide evenly, so it is split
        with sizes differing by one instead of TRL's equal split (which would drop the remainder rows)."""
        if self.args.gold_placement != "append" or self.mode != "train":
            return super().next_micro_batch(generation_batch)
        steps = self.args.steps_per_generation
        return buffered_micro_batch(self, generation_batch, split=lambda b: split_rows_evenly(shuffle_rows(b), steps))


def _with_extra_fields(inputs: list[dict], extra_fields: dict) -> list[dict]:
    """Copies of the rows with ``rollout_func`` extra fields merged, as TRL does before scoring
    (``_generate_and_score_completions``, TRL 1.14.2, 1.16.0)."""
    if not extra_fields:
        return inputs
    rows = [dict(x) for x in inputs]
    for i, row in enumerate(rows):
        for key, values in extra_fields.items():
            if isinstance(values, list) and i < len(values):
                row[key] = values[i]
            elif not isinstance(values, list):
                row[key] = values
    return rows


def _check_reference_column(train_dataset, column: str) -> None:
    """Start-up check that the training data has the reference column."""
    if train_dataset is None:
        return
    columns = getattr(train_dataset, "column_names", None)
    if columns is None:  # e.g. a streaming IterableDataset with unknown features: look at one row
        columns = list(next(iter(train_dataset)).keys())
    if column not in columns:
        raise ValueError(
            f"train_dataset has no column {column!r} (GCPOConfig.reference_column); its columns are {sorted(columns)}. "
            "Set reference_column to the column holding the reference solutions, or gold_trigger='never'."
        )
