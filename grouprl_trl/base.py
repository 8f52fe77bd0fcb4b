"""What every grouprl TRL trainer needs, written once: :class:`GroupRLTrainer` and :class:`GroupRLConfigMixin`.

A trainer subclasses :class:`GroupRLTrainer` (itself a ``trl.GRPOTrainer``, through the hooks of
:mod:`grouprl_trl._compat`) and keeps only what makes its algorithm different. The base owns:

* construction: a default config named after the model and the algorithm, the config type check;
* rewards: TRL's scoring, with the reward function that raised named in the error and one policy for
  non-finite rewards (a completion no function scored, or any inf, is a ValueError naming the
  functions), the gathered ``(N, F)`` matrix kept as :attr:`GroupRLTrainer._last_rewards_per_func`,
  TRL's weighted sum, and this process's slice of global rows;
* the generation batch: :meth:`GroupRLTrainer.assemble_batch` is the algorithm's hook; whatever
  advantages it leaves in the batch are the ones the completions table (``log_completions``) shows,
  row by row, so logged advantages equal trained advantages for every trainer;
* the loss: the policy forward with every input TRL passes (multimodal, MoE aux loss), and the loss
  tail of TRL's ``_compute_loss`` (vLLM importance-sampling correction, k3 KL when ``beta != 0``,
  aggregation with gradient-accumulation scaling, ``router_aux_loss_coef * aux_loss``, entropy / KL /
  clip metrics); real skipped steps (no graph, so the optimizer moves nothing), reported: a warning
  the first time an optimizer step is skipped and after every ``skip_warning_every`` consecutive
  skips, with the trainer's ``skip_reason``, and a count of skipped steps when training ends
  (:class:`SkippedStepReport`).
"""

from __future__ import annotations

import logging
from dataclasses import field
from typing import ClassVar

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOConfig

from grouprl_core.algorithms import ALGORITHMS
from grouprl_core.losses import aggregate_token_loss, k3_kl
from grouprl_core.skips import DEFAULT_WARNING_EVERY, SkipReport

from ._compat import (
    PolicyOutput,
    TRLHooks,
    append_logged_rows,
    capture_logged_rows,
    metrics,
    policy_forward,
)
from .rewards import check_reward_matrix, note_failing_reward_function
from .vllm_support import check_vllm_support

logger = logging.getLogger(__name__)

LOGGED_ROWS = "grouprl_logged_rows"  # batch key: this process's completions-table rows, until they are logged
UNLOGGED_ROW = {"prompt": None, "completion": None, "rewards": {}, "extra": {}}


# ----------------------------------------------------------------------------- config
def choice_field(default: str, choices, help: str):
    """A config field that takes one of ``choices`` (listed in TrlParser's ``--help``; checked by
    :func:`check_choice`, since dataclasses do not check them)."""
    return field(default=default, metadata={"help": help, "choices": list(choices)})


def card_paper(key: str) -> dict[str, str]:
    """The ``paper`` of a trainer (TRL's model-card citation) from :data:`grouprl_core.algorithms.ALGORITHMS`."""
    paper = ALGORITHMS[key].paper
    return {"title": paper.title, "id": paper.arxiv}


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def dual_clip_field(default: float):
    """The dual-clip constant of the clipped PPO surrogate (COPO and GCPO-guidance), checked by
    :func:`check_dual_clip`."""
    return field(default=default, metadata={
        "help": "Dual-clip constant c > 1: for A < 0 the per-token loss is capped at -c*A. None disables."})


def check_dual_clip(value: float | None) -> None:
    if value is not None and not value > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {value!r}")


def unsupported_grpo_fields(trainer_name: str, entropy_hint: str | None = None) -> dict[str, tuple[tuple, str]]:
    """GRPOConfig loss features no grouprl loss implements: field -> (accepted values, why)."""
    why = f"not supported by {trainer_name}"
    return {
        "top_entropy_quantile": ((1.0,), why),
        "off_policy_mask_threshold": ((None,), why),
        "delta": ((None,), why),
        "entropy_coef": ((0.0,), entropy_hint or why),
        "use_adaptive_entropy": ((False,), entropy_hint or why),
    }


class GroupRLConfigMixin:
    """Mixed into each grouprl config (before ``GRPOConfig``). ``UNUSED_GRPO_FIELDS`` maps a GRPOConfig
    field the trainer never reads to (accepted values, why / what to use instead)."""

    UNUSED_GRPO_FIELDS: ClassVar[dict[str, tuple[tuple, str]]] = {}

    def reject_unused_grpo_fields(self) -> None:
        """Changing a field the trainer never reads would silently do nothing: an error naming the field."""
        for name, (accepted, why) in self.UNUSED_GRPO_FIELDS.items():
            value = getattr(self, name)
            if not any(value == a for a in accepted):
                raise ValueError(
                    f"{name}={value!r} has no effect in {type(self).__name__} ({why}); "
                    f"leave {name} at its default {accepted[0]!r}."
                )


# ----------------------------------------------------------------------------- trainer
class GroupRLTrainer(TRLHooks):
    """Base of the grouprl TRL trainers (same constructor as ``GRPOTrainer``).

    Subclasses set ``config_class``, ``algorithm_name`` (which also names the default output
    directory) and ``paper``, put their start-up checks and state in :meth:`init_algorithm`, override
    :meth:`assemble_batch` to replace TRL's advantages and :meth:`algorithm_loss` to replace TRL's loss,
    and set ``skip_key`` to a batch key that, when True, skips the optimizer step, with ``skip_reason``
    saying why (and which field to change) in the warnings of :class:`SkippedStepReport`.
    """

    config_class: ClassVar[type] = GRPOConfig
    algorithm_name: ClassVar[str] = "GRPO"
    skip_key: ClassVar[str | None] = None
    skip_reason: ClassVar[str] = "the algorithm found nothing to learn from in the batch"
    skip_warning_every: ClassVar[int] = DEFAULT_WARNING_EVERY  # warn again after this many skipped steps in a row

    def __init__(self, model, reward_funcs=None, args=None, **kwargs):
        args = self.resolve_args(model, args)
        check_vllm_support(args)  # before GRPOTrainer.__init__, which builds the vLLM engine
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self._last_rewards_per_func: torch.Tensor | None = None  # gathered (N, F) of the last scoring
        self.skipped_steps = SkippedStepReport(self)
        self.add_callback(self.skipped_steps)
        self.init_algorithm()

    def init_algorithm(self) -> None:
        """The algorithm's start-up checks and state, once TRL's trainer is built (default: none)."""

    @classmethod
    def resolve_args(cls, model, args):
        """``args``, or the default config ``<model name>-<algorithm>`` as TRL names GRPO's; must be a ``config_class``."""
        if args is None:
            name = model if isinstance(model, str) else model.name_or_path
            args = cls.config_class(f"{str(name).split('/')[-1] or 'model'}-{cls.algorithm_name}")
        if not isinstance(args, cls.config_class):
            raise TypeError(f"{cls.__name__} needs args={cls.config_class.__name__}(...), got {type(args).__name__}")
        return args

    # ------------------------------------------------------------------ metrics
    @property
    def mode(self) -> str:
        return "train" if self.model.training else "eval"

    def record_metric(self, name: str, value: float, mode: str | None = None) -> None:
        """Append to the metric ``name``; TRL averages and logs it at the next logging step."""
        metrics(self, mode or self.mode)[name].append(float(value))

    def global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of ``values`` over the valid tokens of all processes (``(B, 1)`` values count per token)."""
        m = mask.to(torch.float32)
        x = values.detach().to(torch.float32).expand_as(m)
        totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    # ------------------------------------------------------------------ rewards
    def score_completions(self, inputs, prompts, completions, completion_ids_list):
        """TRL's scoring through :meth:`checked_scores`, kept as :attr:`_last_rewards_per_func`."""
        rewards = self.checked_scores(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards
        return rewards

    def checked_scores(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        """``GRPOTrainer._calculate_rewards``'s gathered ``(N, F)`` rewards, with faults made loud.

        An exception inside a reward function keeps its type and gets a note naming the function.
        A completion no function scored (all None/NaN) or any inf reward is a ValueError naming the
        functions: TRL would give the first advantage 0 and let the second turn the weights NaN, and
        every grouprl algorithm counts its batch (B, M, H_q, gold triggers) on finite rewards.
        """
        try:
            rewards = super().score_completions(inputs, prompts, completions, completion_ids_list)
        except Exception as err:
            note_failing_reward_function(err, self.reward_funcs, self.reward_func_names)
            raise
        check_reward_matrix(rewards, self.reward_func_names, self.algorithm_name)
        return rewards

    def weighted_rewards(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """TRL's total reward ``sum_f w_f r_f`` (``nansum``: a function's None does not count), ``(N,)``."""
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        return (rewards_per_func * weights).nansum(dim=1)

    def local_rows(self, values, num_local: int):
        """This process's rows ``[rank * n, (rank + 1) * n)`` of values gathered in process order."""
        start = self.accelerator.process_index * num_local
        return values[start : start + num_local]

    # ------------------------------------------------------------------ generation batch
    def build_generation_batch(self, inputs: list[dict]) -> dict:
        """The algorithm's batch (:meth:`assemble_batch`), then its rows with their final advantages
        into the completions table (a row whose :data:`LOGGED_ROWS` entry is None, a filler, is left out)."""
        batch = self.assemble_batch(inputs)
        rows = batch.pop(LOGGED_ROWS)
        advantages = batch["advantages"]
        if advantages.dim() == 2:  # token-level advantages: the table shows each row's mean
            mask = self.loss_mask(batch).to(advantages.dtype)
            advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        shown = [i for i, row in enumerate(rows) if row is not None]
        values = advantages.tolist()
        append_logged_rows(self, gather_object([rows[i] for i in shown]), gather_object([values[i] for i in shown]))
        return batch

    def assemble_batch(self, inputs: list[dict]) -> dict:
        """The algorithm's hook: this process's generation batch with its final advantages (default: TRL's)."""
        return self.scored_round(inputs)

    def scored_round(self, inputs: list[dict]) -> dict:
        """One TRL generation + scoring round; its completions-table rows travel in the batch
        (key :data:`LOGGED_ROWS`, one per row) until :meth:`build_generation_batch` logs them."""
        with capture_logged_rows(self) as rows:
            batch = super().build_generation_batch(inputs)
        num_local = batch["completion_ids"].size(0)
        missing = num_local * self.accelerator.num_processes - len(rows)  # TRL's table holds one generation batch
        batch[LOGGED_ROWS] = self.local_rows([UNLOGGED_ROW] * missing + rows, num_local)
        return batch

    def set_advantages(self, batch: dict, advantages: torch.Tensor) -> None:
        """Replace TRL's advantages by this process's ``(B,)`` (or ``(B, T)``) trained ones."""
        batch["advantages"] = advantages.to(device=batch["completion_ids"].device, dtype=torch.float32)

    @staticmethod
    def loss_mask(batch: dict) -> torch.Tensor:
        """Tokens the loss sees: the completion mask, times the tool mask when tools are used (as TRL)."""
        mask = batch["completion_mask"]
        return mask if batch.get("tool_mask") is None else mask * batch["tool_mask"]

    def recount_items(self, batch: dict) -> None:
        """``num_items_in_batch`` after rows changed: loss tokens of the generation batch of all processes."""
        batch["num_items_in_batch"] = self.accelerator.gather(self.loss_mask(batch).sum()).sum()

    # ------------------------------------------------------------------ loss
    def policy_loss(self, model, inputs: dict) -> torch.Tensor:
        """:meth:`algorithm_loss`, or a real skip when the batch says so (``skip_key``)."""
        skip = self.skip_key is not None and bool(inputs.get(self.skip_key, False))
        if self.mode == "train":
            self.skipped_steps.micro_batch(skip)
            if skip:
                # No forward, no graph: backward leaves every .grad None, so the optimizer step moves nothing.
                return torch.zeros((), device=self.accelerator.device, requires_grad=True)
        return self.algorithm_loss(model, inputs)

    def algorithm_loss(self, model, inputs: dict) -> torch.Tensor:
        """The algorithm's loss hook (default: TRL's ``_compute_loss``)."""
        return super().policy_loss(model, inputs)

    def forward_policy(self, model, inputs: dict) -> PolicyOutput:
        """The loss's policy forward, with entropies and (MoE) the router aux loss, as TRL's ``_compute_loss``."""
        return policy_forward(self, model, inputs, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled)

    @staticmethod
    def old_logps(inputs: dict, logps: torch.Tensor) -> torch.Tensor:
        """The behaviour policy's log-probs: TRL's ``old_per_token_logps`` when it computed them (off-policy
        steps, vLLM), else the current ones detached (on-policy: ratio 1), as TRL's ``_compute_loss``."""
        old = inputs.get("old_per_token_logps")
        return logps.detach() if old is None else old

    def accumulation_steps(self) -> float:
        """Gradient-accumulation steps the loss is divided by (1 in evaluation)."""
        return self.current_gradient_accumulation_steps if self.mode == "train" else 1.0

    def token_mean_normalizer(self, inputs: dict) -> torch.Tensor:
        """Token count ``token-mean`` divides by, as TRL's ``loss_type="dapo"``: the loss tokens of one
        gradient-accumulation window on one process (``num_items_in_batch`` counts the generation batch of
        all processes), so the accumulated gradient is the mean over the whole batch's tokens."""
        total = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.mode == "train":
            total = total * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return total

    def aggregate_loss(self, per_token_loss: torch.Tensor, mask: torch.Tensor, inputs: dict, agg: str) -> torch.Tensor:
        """``(B, T)`` -> scalar with :func:`grouprl_core.losses.aggregate_token_loss`, scaled for gradient
        accumulation (``token-mean`` through its global normaliser, the others by the step count)."""
        if agg == "token-mean":
            return aggregate_token_loss(per_token_loss, mask, agg, total_tokens=self.token_mean_normalizer(inputs))
        loss = aggregate_token_loss(per_token_loss, mask, agg, norm_length=self.max_completion_length)
        return loss / self.accumulation_steps()

    def finish_loss(
        self,
        per_token_loss: torch.Tensor,
        inputs: dict,
        out: PolicyOutput,
        *,
        agg: str,
        ratio: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The tail of ``GRPOTrainer._compute_loss`` (TRL 1.14.2, 1.16.0) for a per-token policy loss:

        ``l * is_ratio`` (vLLM importance-sampling correction) ``+ beta * KL`` (k3, times ``ratio`` with
        ``use_bias_correction_kl``) ``+ extra`` (an algorithm's own per-token term), aggregated with
        ``agg`` and gradient-accumulation scaling, plus ``router_aux_loss_coef * aux_loss`` for MoE
        models; logs ``entropy``, ``kl`` and ``aux_loss`` as TRL does.
        """
        mask = self.loss_mask(inputs)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]
        per_token_kl = None
        if self.beta != 0.0:
            per_token_kl = k3_kl(out.logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl and ratio is not None:
                per_token_kl = per_token_kl * ratio
            per_token_loss = per_token_loss + self.beta * per_token_kl
        if extra is not None:
            per_token_loss = per_token_loss + extra
        loss = self.aggregate_loss(per_token_loss.expand_as(mask), mask, inputs, agg)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * out.aux_loss / self.accumulation_steps()
            self.record_metric("aux_loss", self.accelerator.gather_for_metrics(out.aux_loss.detach()).mean().item())
        self.record_metric("entropy", self.global_masked_mean(out.entropies, mask))
        if per_token_kl is not None:
            self.record_metric("kl", self.global_masked_mean(per_token_kl, mask))
        return loss

    def log_clip_metrics(self, ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor | None = None) -> None:
        """TRL's ``clip_ratio/{low,high,region}_mean``. With ``advantages``, a token counts where the clip binds
        (TRL's definition: low with A < 0, high with A > 0); without, wherever the ratio leaves the range."""
        low = ratio < 1 - self.epsilon_low
        high = ratio > 1 + self.epsilon_high
        if advantages is not None:
            adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
            low, high = low & (adv < 0), high & (adv > 0)
        self.record_metric("clip_ratio/low_mean", self.global_masked_mean(low, mask))
        self.record_metric("clip_ratio/high_mean", self.global_masked_mean(high, mask))
        self.record_metric("clip_ratio/region_mean", self.global_masked_mean(low | high, mask))


# ----------------------------------------------------------------------------- skipped steps
# the first warning's last sentence: what a skipped step means in TRL's loop
TRL_SKIP_NOTE = "A skipped step counts for global_step and the learning-rate schedule but changes no weight."


class SkippedStepReport(TrainerCallback):
    """Tells :class:`grouprl_core.skips.SkipReport` which optimizer steps a trainer skipped and logs what it
    says (main process only).

    A step is skipped when every micro-batch of it carried the trainer's ``skip_key`` (the skip is
    decided on all processes' rows, so every process agrees). Warnings: at the first skipped step,
    then each time the run of consecutive skips reaches a multiple of ``skip_warning_every``; each
    names the step(s) and the trainer's ``skip_reason``. When training ends, one line gives the
    number of skipped steps (a warning when there were any).
    """

    def __init__(self, trainer: GroupRLTrainer):
        self.trainer = trainer
        self.report = self._new_report()
        self._micro: list[bool] = []  # skip flag of each micro-batch of the current optimizer step

    def _new_report(self) -> SkipReport:
        t = self.trainer
        return SkipReport(t.algorithm_name, t.skip_reason, every=t.skip_warning_every, note=TRL_SKIP_NOTE)

    # counts of the current call of train()
    skipped = property(lambda self: self.report.skipped)
    steps = property(lambda self: self.report.steps)
    in_a_row = property(lambda self: self.report.in_a_row)

    def micro_batch(self, skipped: bool) -> None:
        self._micro.append(bool(skipped))

    def _say(self, message: str | None, level: int = logging.WARNING) -> None:
        if message is not None and self.trainer.accelerator.is_main_process:
            logger.log(level, message)

    def on_train_begin(self, args, state, control, **kwargs):
        self.report = self._new_report()  # reads skip_reason / skip_warning_every as they are now
        self._micro = []

    def on_step_end(self, args, state, control, **kwargs):
        micro, self._micro = self._micro, []
        self._say(self.report.step(state.global_step, bool(micro) and all(micro)))

    def on_train_end(self, args, state, control, **kwargs):
        if self.report.skipped:
            self._say(self.report.summary())
        elif self.trainer.skip_key is not None:
            self._say(self.report.summary(), logging.INFO)
