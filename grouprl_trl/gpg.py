"""GPG for TRL: ``GPGTrainer`` / ``GPGConfig``, drop-in replacements for ``GRPOTrainer`` /
``GRPOConfig``.

Paper: Chu et al., "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
Reasoning" (arXiv 2504.02546, ICLR 2026). The math lives in :mod:`grouprl_core.gpg`; this
module only moves TRL's tensors in and out.

What changes compared with GRPO:
- advantages ``A_i = alpha (r_i - mean_g) / F_norm`` with ``alpha = B / (B - M)`` over the
  global generation batch (rewards are gathered over all processes before this);
- loss ``-logp * A`` (no ratio, no clip, no KL, no reference model; ``beta`` must be 0);
- valid-fraction threshold ``valid_threshold`` (beta_th): while fewer than beta_th of the
  batch's groups have non-equal rewards, another round is generated from fresh prompts
  (at most ``max_resample_rounds``); valid groups of every round are kept, oldest first
  (the rule is :func:`grouprl_core.gpg.plan_gpg_batch`, shared with the verl adapter).
- carry-over: valid groups that did not fit into the batch are kept for the *next*
  generation batch (at most one batch worth, used first next time, so at most one optimizer
  step old). Policy lag: such a group was sampled from the policy one step earlier; the
  plain PG loss has no ratio to correct it (neither does the official code), so the lag is
  bounded to one step, counted in ``gpg/carried_frac``, and ``carry_over=False`` drops them.
- a batch where every group is zero-variance skips the optimizer step for real: no
  backward, so no parameter has a gradient and AdamW leaves weights, moments and weight
  decay untouched (``gpg/skipped_step``).
- the completions table (``log_completions``) lists the rows of the assembled batch with their
  GPG advantages (rows of several rounds and carried rows included).
- checkpoints hold the carry buffer and the position of the private resampling sampler
  (``gpg_state_rank{R}.pt``, one per process), so a resumed run continues exactly where the
  interrupted one stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch
from trl import GRPOConfig

from grouprl_core import names
from grouprl_core.gpg import (
    DEFAULT_MAX_RESAMPLE_ROUNDS,
    DEFAULT_VALID_THRESHOLD,
    F_NORM_MODES,
    gpg_advantages,
    gpg_needs_more,
    group_valid_flags,
    plan_gpg_batch,
    usable_valid_groups,
)
from grouprl_core.groups import contiguous_group_ids
from grouprl_core.losses import AGG_MODES, policy_gradient_loss

from ._compat import repeat_sampler, text_tokenizer
from .base import LOGGED_ROWS, UNLOGGED_ROW, GroupRLConfigMixin, GroupRLTrainer, unsupported_grpo_fields
from .batching import batch_size_of, select_and_concat

# preset name -> field values it sets
GPG_PRESETS = {
    "paper": {"advantage_norm": "none", "age": True, "valid_threshold": DEFAULT_VALID_THRESHOLD},
    # The official 1.5B runs (open-rs, TRL commit 69ad852): A = (r - mean)/(std + 1e-4), alpha 1, no resampling.
    "open_rs_1p5b": {"advantage_norm": "group", "age": False, "valid_threshold": 0.0},
}
NO_RATIO = "GPG has no ratio and no clipping"


@dataclass
class GPGConfig(GroupRLConfigMixin, GRPOConfig):
    r"""Configuration for :class:`GPGTrainer`: every ``GRPOConfig`` field plus the GPG fields below."""

    gpg_preset: str = field(
        default="paper",
        metadata={
            "help": "'paper' (the field defaults: F_norm 1, AGE alpha, beta_th 0.6; single fields may be changed "
            "for ablations) or 'open_rs_1p5b' (the official 1.5B runs: F_norm = group std, alpha 1, no "
            "resampling), which sets advantage_norm, age and valid_threshold; giving one of them a value that "
            "contradicts the preset is an error.",
            "choices": list(GPG_PRESETS),
        },
    )
    advantage_norm: str = field(
        default="none",
        metadata={"help": "F_norm: 'none' (1), 'group' (group std + 1e-4) or 'batch' (batch std + 1e-4).",
                  "choices": list(F_NORM_MODES)},
    )
    age: bool = field(default=True, metadata={"help": "Scale advantages by alpha = B / (B - M) (AGE)."})
    valid_threshold: float = field(
        default=DEFAULT_VALID_THRESHOLD,
        metadata={"help": "beta_th: regenerate while the valid fraction (B - M) / B is below this; 0 disables."},
    )
    max_resample_rounds: int = field(
        default=DEFAULT_MAX_RESAMPLE_ROUNDS,
        metadata={"help": "Bound on extra generation rounds per batch (official code: 20)."},
    )
    carry_over: bool = field(
        default=True, metadata={"help": "Keep valid groups that did not fit for the next batch (one step old)."}
    )
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": f"Token aggregation of -logp*A: one of {AGG_MODES}.", "choices": list(AGG_MODES)},
    )

    # GRPOConfig fields that GPG's advantage and loss never read: field -> (accepted values, what to use instead).
    UNUSED_GRPO_FIELDS = {
        **unsupported_grpo_fields("GPGTrainer"),
        "loss_type": (("dapo",), "GPG aggregates -logp*A with loss_agg_mode"),
        "scale_rewards": (("group", True), "GPG scales advantages with advantage_norm (F_norm)"),
        "epsilon": ((0.2,), NO_RATIO),
        "epsilon_high": ((None,), NO_RATIO),
        "delta": ((None,), NO_RATIO),
        "importance_sampling_level": (("token",), "GPG has no importance ratio"),
    }

    def __post_init__(self):
        self._apply_gpg_preset()
        if self.advantage_norm not in F_NORM_MODES:
            raise ValueError(f"advantage_norm must be one of {F_NORM_MODES}, got {self.advantage_norm!r}")
        if not 0.0 <= float(self.valid_threshold) <= 1.0:
            raise ValueError(f"valid_threshold (beta_th) must be in [0, 1], got {self.valid_threshold}")
        if int(self.max_resample_rounds) < 0:
            raise ValueError(f"max_resample_rounds must be >= 0, got {self.max_resample_rounds}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.beta != 0.0:
            raise ValueError(
                f"beta={self.beta}: GPG has no KL term and no reference model. Set beta=0.0 (the GPGConfig default)."
            )
        self.reject_unused_grpo_fields()
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: GPG needs a group of at least 2 completions per prompt "
                "for a group-mean baseline. Set num_generations >= 2."
            )
        super().__post_init__()

    def _apply_gpg_preset(self):
        if self.gpg_preset not in GPG_PRESETS:
            raise ValueError(f"gpg_preset must be one of {list(GPG_PRESETS)}, got {self.gpg_preset!r}")
        if self.gpg_preset == "paper":  # the field defaults are the paper's; ablations override single fields
            return
        defaults = {f.name: f.default for f in fields(self) if f.name in GPG_PRESETS["paper"]}
        for name, value in GPG_PRESETS[self.gpg_preset].items():
            current = getattr(self, name)
            if current != value and current != defaults[name]:
                raise ValueError(
                    f"gpg_preset={self.gpg_preset!r} sets {name}={value!r}, but {name}={current!r} was given. "
                    f"Drop {name} or choose another gpg_preset."
                )
            setattr(self, name, value)


class GPGTrainer(GroupRLTrainer):
    """Group Policy Gradient on top of TRL's ``GRPOTrainer`` (same constructor)."""

    config_class = GPGConfig
    algorithm_name = "GPG"
    paper = {"title": "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning", "id": "2504.02546"}
    skip_key = "gpg_skip"

    def init_algorithm(self):
        if self.ref_model is not None:  # defensive: beta is validated to be 0 in GPGConfig
            raise RuntimeError("GPG must not create a reference model")
        if self.args.valid_threshold > 0:
            local_rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
            if local_rows % self.num_generations != 0:
                raise ValueError(
                    f"valid_threshold>0 keeps whole groups per process: per_device_train_batch_size * "
                    f"steps_per_generation = {local_rows} must be a multiple of num_generations="
                    f"{self.num_generations}. Change per_device_train_batch_size or set valid_threshold=0."
                )
        self._carry: dict | None = None  # valid groups carried to the next generation batch
        self._resample_iter = None
        self._resample_epoch = 0
        self._resample_consumed = 0  # indices drawn from the current resampling pass (for resume)

    # ------------------------------------------------------------------ advantages
    def assemble_batch(self, inputs):
        """Training: a thresholded batch (rounds + carry-over); evaluation: one round. Then GPG's advantages."""
        batch = self._generate_gpg_batch(inputs) if self.mode == "train" else self._gpg_round(inputs)
        self._set_gpg_advantages(batch, mode=self.mode)
        return batch

    def _gpg_round(self, inputs: list[dict]) -> dict:
        """One scored round with this process's weighted rewards attached (``gpg_rewards``)."""
        batch = self.scored_round(inputs)
        rewards = self.weighted_rewards(self._last_rewards_per_func)
        batch["gpg_rewards"] = self.local_rows(rewards, batch_size_of(batch)).clone()
        return batch

    def _set_gpg_advantages(self, batch: dict, mode: str) -> None:
        """Overwrite ``batch["advantages"]`` with GPG's, computed on the rewards of all processes."""
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        global_rewards = self.accelerator.gather(batch["gpg_rewards"])
        result = gpg_advantages(
            global_rewards,
            contiguous_group_ids(global_rewards.numel(), group_size, device=global_rewards.device),
            f_norm=self.args.advantage_norm,
            use_age=self.args.age,
        )
        self.set_advantages(batch, self.local_rows(result.advantages, batch_size_of(batch)))
        batch["gpg_skip"] = torch.tensor(result.skip_update, device=global_rewards.device)
        self.record_metric(names.GPG_ALPHA, result.alpha, mode)
        self.record_metric(names.GPG_VALID_FRACTION, result.valid_fraction, mode)
        self.record_metric(names.GPG_SKIPPED_STEP, float(result.skip_update), mode)

    # ------------------------------------------------------------------ threshold + carry-over
    def _generate_gpg_batch(self, generation_batch: list[dict]) -> dict:
        """Generate one batch whose valid-group fraction reaches ``valid_threshold`` (or the bound).

        Valid groups (non-equal rewards) from the carry buffer and from every round are kept,
        oldest first; the batch is filled up with the last round's zero-variance groups
        (:func:`grouprl_core.gpg.plan_gpg_batch`). Each process plans its own share of whole
        groups; the threshold compares the valid fraction of all processes.
        """
        first = self._gpg_round(generation_batch)
        args = self.args
        if args.valid_threshold <= 0:
            self.record_metric(names.GPG_RESAMPLE_ROUNDS, 0.0, "train")
            return first
        g = self.num_generations
        groups_local = batch_size_of(first) // g
        groups_global = groups_local * self.accelerator.num_processes
        carried = self._carry is not None and args.carry_over
        rounds = [self._carry] if carried else []
        round_valid = [[True] * (batch_size_of(self._carry) // g)] if carried else []  # carried groups are valid
        self._carry = None
        rounds.append(first)
        round_valid.append(self._valid_flags(first))

        extra_rounds = 0
        while gpg_needs_more(self._valid_fraction(round_valid, groups_local, groups_global),
                             threshold=args.valid_threshold, extra_rounds=extra_rounds,
                             max_rounds=args.max_resample_rounds):
            extra_rounds += 1
            batch = self._gpg_round(self._next_resample_inputs())
            rounds.append(batch)
            round_valid.append(self._valid_flags(batch))

        plan = plan_gpg_batch(round_valid, groups_local, carry_over=args.carry_over, carried_round=carried)
        merged = self._select_groups(rounds, plan, plan.chosen)
        if plan.carry:
            self._carry = self._select_groups(rounds, plan, plan.carry)
        self.recount_items(merged)
        self.record_metric(names.GPG_RESAMPLE_ROUNDS, float(extra_rounds), "train")
        self.record_metric(names.GPG_EXTRA_PROMPTS, float(extra_rounds * groups_global), "train")
        self.record_metric(names.GPG_CARRIED_FRAC, plan.num_carried_used / groups_local, "train")
        return merged

    def _valid_flags(self, batch: dict) -> list[bool]:
        g = self.num_generations
        return group_valid_flags(batch["gpg_rewards"], contiguous_group_ids(batch_size_of(batch), g))

    def _valid_fraction(self, round_valid, groups_local: int, groups_global: int) -> float:
        usable = torch.tensor([usable_valid_groups(round_valid, groups_local)], device=self.accelerator.device)
        return self.accelerator.gather(usable).sum().item() / groups_global

    def _select_groups(self, rounds: list[dict], plan, pairs) -> dict:
        g = self.num_generations
        pieces = [(batch, [k * g + j for k in plan.groups_of(pairs, r) for j in range(g)])
                  for r, batch in enumerate(rounds)]
        return select_and_concat(pieces, text_tokenizer(self).pad_token_id)

    def _next_resample_inputs(self) -> list[dict]:
        """The next local generation batch of fresh prompts, from a private sampler.

        Mirrors the trainer's own sampler layout (each prompt ``G`` times in a row); process ``p``
        takes the ``p``-th chunk.
        """
        global_rows = self.args.generation_batch_size
        local_rows = global_rows // self.accelerator.num_processes
        while True:
            if self._resample_iter is None:
                self._resample_iter = self._new_resample_iter()
            indices = []
            try:
                for _ in range(global_rows):
                    indices.append(next(self._resample_iter))
                    self._resample_consumed += 1
            except StopIteration:
                self._resample_iter = None
                self._resample_epoch += 1
                self._resample_consumed = 0
                if not indices:
                    continue
            if len(indices) < global_rows:  # a short tail at the end of the data: start a new pass
                continue
            mine = self.local_rows(indices, local_rows)
            return [self.train_dataset[i] for i in mine]

    def _new_resample_iter(self):
        """A fresh pass of the resampling sampler (seeded by the pass number, so it can be replayed)."""
        g = self.num_generations
        sampler = repeat_sampler(self.train_dataset, g, self.args.generation_batch_size // g,
                                 seed=self.args.seed + 1000 + self._resample_epoch)
        return iter(sampler)

    # ------------------------------------------------------------------ checkpoint state
    def _gpg_state_path(self, checkpoint_dir: str) -> str:
        return os.path.join(checkpoint_dir, f"gpg_state_rank{self.accelerator.process_index}.pt")

    def save_extra_state(self, checkpoint_dir: str) -> None:
        """This process's GPG state, next to the checkpoint TRL wrote (one file per process, each holds
        its own carry buffer): the carried groups (tensors moved to CPU) and the resampling sampler's
        pass number and position. RNG states are saved by transformers already."""
        os.makedirs(checkpoint_dir, exist_ok=True)
        carry = None
        if self._carry is not None:
            carry = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self._carry.items()}
        state = {"carry": carry, "resample_epoch": self._resample_epoch, "resample_consumed": self._resample_consumed}
        torch.save(state, self._gpg_state_path(checkpoint_dir))

    def load_extra_state(self, checkpoint_dir: str) -> None:
        """Restore the state :meth:`save_extra_state` wrote. Runs once per resume on every backend (DDP,
        FSDP, DeepSpeed). A checkpoint without the file (written by ``GRPOTrainer``, or by an older
        grouprl) is an error rather than a silent restart with an empty buffer."""
        path = self._gpg_state_path(checkpoint_dir)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint holds no GPG state (carry buffer, resampling position) for "
                f"process {self.accelerator.process_index}. Resume from a checkpoint written by GPGTrainer with the "
                "same number of processes."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        device = self.accelerator.device
        carry = state["carry"]
        self._carry = None if carry is None else {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in carry.items()
        }
        if self._carry is not None and LOGGED_ROWS not in self._carry:  # written before rows were logged
            self._carry[LOGGED_ROWS] = [UNLOGGED_ROW] * batch_size_of(self._carry)
        self._resample_epoch = int(state["resample_epoch"])
        consumed = int(state["resample_consumed"])
        self._resample_iter, self._resample_consumed = None, 0
        if consumed:  # replay the pass up to where it stopped (the sampler is seeded by the pass number)
            self._resample_iter = self._new_resample_iter()
            for _ in range(consumed):
                next(self._resample_iter)
            self._resample_consumed = consumed

    # ------------------------------------------------------------------ loss
    def algorithm_loss(self, model, inputs):
        """Plain policy gradient ``-logp * A``, aggregated with ``loss_agg_mode`` (replaces TRL's loss)."""
        out = self.forward_policy(model, inputs)
        per_token_loss = policy_gradient_loss(out.logps, inputs["advantages"])
        return self.finish_loss(per_token_loss, inputs, out, agg=self.args.loss_agg_mode)
