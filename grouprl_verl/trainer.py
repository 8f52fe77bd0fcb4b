"""``GroupRLRayPPOTrainer``: verl's legacy ``RayPPOTrainer`` (0.9.1) plus the steps registries cannot do.

It implements the hooks of :class:`grouprl_verl._compat.RayPPOTrainerHooks`, which maps the narrow private
steps of ``verl.trainer.ppo.ray_trainer.RayPPOTrainer`` that ``fit`` calls at the right moments to named
hooks; ``fit`` itself is verl's:

* ``before_balance``: GPG records the step's groups in generation order before ``_balance_batch`` sorts the
  rows by length (the threshold counts a round's groups in that order, as TRL in sampling order).
* ``prepare_rewards`` (when verl balances the batch or gets a colocated reward model's scores, before
  ``fit`` takes references to the reward extras): the reward-extra arrays become object arrays, so rows
  rewritten later keep full values.
* ``before_old_log_prob(batch)`` runs after the rewards (``rm_scores``) are known and before any
  log-prob pass:
  - GCPO-gold: rewrite one rollout of every all-wrong group with the reference solution and score
    it through verl's reward loop, like every rollout (:func:`grouprl_verl.hooks.inject_gold`); after
    it, the gold rows count as on-policy for verl's rollout correction;
  - GPG with ``valid_threshold > 0``: assemble a batch whose valid-group fraction reaches beta_th
    from extra generation rounds and carried groups (:class:`grouprl_verl.hooks.GPGGroupAssembler`).
  Both write into the batch in place (``fit`` holds references to its tensors and arrays).
* ``actor_update(batch, run_update)`` runs after ``compute_advantage``. Before verl's update:
  - COPO: attach the global advantage and gate per sample (:func:`~grouprl_verl.hooks.attach_copo_fields`);
    ``init_workers`` installed :func:`grouprl_verl.losses.grouprl_ppo_loss` on the actor so the
    ``grouprl_copo`` loss sees them;
  - GCPO-guidance: dynamic filter, one no-grad ``compute_log_prob`` pass of the responses behind the
    negative context, token weights on the advantages (:mod:`grouprl_verl.hooks`);
  - GPG / guidance: a batch without any learning signal skips the update for real (no optimizer
    step, so weight decay does not move the weights either), with the warnings of
    :class:`grouprl_core.skips.SkipReport` (the TRL trainers' rule); ``fit`` ends with their count.
  It also logs the grouprl metrics with the actor's.
* ``after_save_checkpoint`` / ``after_load_checkpoint``: GPG's carry buffer and the position of its
  extra-round sampler travel with verl's checkpoint (``grouprl_gpg.pt`` in ``global_step_N``).

``tests/test_verl_fit_cpu.py`` runs ``fit`` through this class on CPU, with stand-ins only for the
GPU parts (see ``grouprl_verl/README.md``).
"""

from __future__ import annotations

import logging
import os
import uuid
from functools import partial

import numpy as np
import torch
from omegaconf import OmegaConf
from verl import DataProto

from grouprl_core.algorithms import ALGORITHMS, by_verl_estimator
from grouprl_core.gold import render_gold
from grouprl_core.groups import zero_variance_mask
from grouprl_core.skips import SkipReport

from . import estimators, hooks, losses
from ._compat import (
    RayPPOTrainerHooks,
    compute_response_mask,
    left_right_2_no_padding,
    no_padding_2_padding,
    omega_conf_to_dataclass,
    tu,
)
from .config import algo_options

# registered estimator -> the algorithm's options block under algorithm.grouprl (gpg, gcpo, copo, guidance)
ESTIMATOR_TO_ALGO = {algo.verl.adv_estimator: algo.verl.params for algo in ALGORITHMS.values()}
GPG_STATE_FILE = "grouprl_gpg.pt"
logger = logging.getLogger(__name__)

# the first skipped-step warning's last sentence: what a skipped update means in verl's fit (the worker's
# train_batch, verl 0.9.1, steps the optimizer and the learning-rate scheduler; a skipped update never calls it)
VERL_SKIP_NOTE = ("A skipped step counts for trainer.total_training_steps but sends nothing to the actor: no weight "
                  "moves and the learning-rate schedule does not advance.")
# verl only: the step's actor update was skipped (no learning signal). The TRL trainers skip the optimizer step
# inside their loss and log the algorithm's own ``gpg/skipped_step`` / ``guidance/skipped_step``, which verl logs too.
SKIPPED_UPDATE = "grouprl/skipped_update"


def grouprl_settings(config) -> tuple[str | None, object]:
    """The grouprl algorithm a composed verl config selects and its validated options.

    Raises ``ValueError`` naming the key and the fix for: the V1 trainer, unknown or bad
    ``algorithm.grouprl.<algo>.*`` keys, COPO without both its estimator and its loss,
    ``rollout_correction.bypass_mode`` or ``trainer.balance_batch=false`` with the hooks that rewrite
    rows before the old log-prob pass, and guidance with MoE router replay R3.
    """
    if config.trainer.get("use_v1", True):
        raise ValueError(
            "trainer.use_v1=true: grouprl's hooks extend the legacy DataProto trainer (RayPPOTrainer). "
            "Set trainer.use_v1=false (the grouprl_* configs do)."
        )
    algorithm = config.algorithm
    algo = ESTIMATOR_TO_ALGO.get(str(algorithm.adv_estimator))
    options = algo_options(algorithm, algo) if algo else None
    actor = config.actor_rollout_ref.actor
    loss_mode = actor.policy_loss.get("loss_mode", "vanilla")
    if (loss_mode == losses.COPO) != (algo == "copo"):
        raise ValueError(
            f"algorithm.adv_estimator={algorithm.adv_estimator} with actor_rollout_ref.actor.policy_loss.loss_mode="
            f"{loss_mode}: COPO needs both set to grouprl_copo (the loss reads the fields the estimator's hook attaches)."
        )
    rewrites_rows = algo == "gcpo" or (algo == "gpg" and options.valid_threshold > 0)
    bypass = (algorithm.get("rollout_correction") or {}).get("bypass_mode", False)
    if bypass and rewrites_rows:
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode=true skips verl's old log-prob pass, before which the GCPO-gold "
            "and GPG-threshold hooks run; set it to false."
        )
    if rewrites_rows and not config.trainer.get("balance_batch", True):
        raise ValueError(
            "trainer.balance_batch=false: GCPO-gold and the GPG threshold rewrite rows after rewards, and grouprl "
            "makes the reward-extra arrays hold any value when verl balances the batch (otherwise a longer "
            "string would be cut). Set trainer.balance_batch=true (with one GPU it only reorders the batch)."
        )
    strategy = actor.get("strategy", "fsdp")
    replay = OmegaConf.select(actor, f"{strategy}.router_replay.mode", default="disabled")
    if algo == "guidance" and replay == "R3":
        raise ValueError(
            f"actor_rollout_ref.actor.{strategy}.router_replay.mode=R3 replays the rollout's MoE routing in every "
            "log-prob pass, but guidance's negative-context sequences were never rolled out. Use R2 (the negative "
            "pass then routes and records by itself) or disabled."
        )
    return algo, options


class GroupRLRayPPOTrainer(RayPPOTrainerHooks):
    """verl's ``RayPPOTrainer`` with grouprl's hooks; same constructor and ``fit``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grouprl_algo, self.grouprl_options = grouprl_settings(self.config)
        estimator = self.config.algorithm.adv_estimator
        loss_mode = self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
        print(f"grouprl: {type(self).__name__}, algorithm={self.grouprl_algo or 'none'} ({estimator} / {loss_mode})",
              flush=True)
        self._gpg_assembler = hooks.GPGGroupAssembler(self.grouprl_options) if self.grouprl_algo == "gpg" else None
        self._rewrites_rows = self.grouprl_algo == "gcpo" or (
            self.grouprl_algo == "gpg" and self.grouprl_options.valid_threshold > 0)
        self._resample_loader = None
        self._resample_iter = None
        self._generation_order = None  # GPG: the step's groups before _balance_batch reordered them
        self.skip_report = self._make_skip_report()

    def _make_skip_report(self) -> SkipReport | None:
        """The skipped-step warnings (grouprl_core.skips, the rule TRL's trainers use) for GPG and guidance."""
        if self.grouprl_algo == "gpg":
            reason = self.grouprl_options.skip_reason(self.config.actor_rollout_ref.rollout.n)
        elif self.grouprl_algo == "guidance":
            reason = self.grouprl_options.skip_reason()
        else:
            return None
        return SkipReport(by_verl_estimator(self.config.algorithm.adv_estimator).label, reason, note=VERL_SKIP_NOTE)

    # ------------------------------------------------------------------ verl's training loop
    def fit(self):
        """verl's ``fit``, then the count of skipped updates (the line TRL logs when training ends)."""
        self.skip_report = self._make_skip_report()  # counts this call of fit only
        super().fit()
        if self.skip_report is not None:
            summary = self.skip_report.summary()
            logger.log(logging.WARNING if self.skip_report.skipped else logging.INFO, summary)

    # ------------------------------------------------------------------ workers
    def init_workers(self):
        super().init_workers()
        if self.grouprl_algo == "copo":
            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            # mirrors ActorRolloutRefWorker.init_model (engine_workers.py:643): partial(ppo_loss, config=actor_config)
            self.actor_rollout_wg.set_loss_fn(partial(losses.grouprl_ppo_loss, config=actor_config))

    # ------------------------------------------------------------------ before verl balances the batch
    def before_balance(self, batch: DataProto) -> None:
        # GPG counts a round's groups in generation order (as TRL in sampling order); _balance_batch sorts rows by
        # length, which would otherwise decide which valid groups train now and which are carried (one step old)
        if self._gpg_assembler is not None:
            self._generation_order = hooks.group_order(batch)

    # ------------------------------------------------------------------ before fit takes the reward extras
    def prepare_rewards(self, data: DataProto) -> None:
        if self._rewrites_rows:
            hooks.object_extras(data)

    # ------------------------------------------------------------------ after rewards, before old log-probs
    def before_old_log_prob(self, batch: DataProto) -> None:
        self._grouprl_metrics = {}
        self._gold_rows = []
        if self.grouprl_algo == "gcpo":
            metrics, self._gold_rows = self._inject_gold(batch)
            self._grouprl_metrics.update(metrics)
        elif self.grouprl_algo == "gpg" and self.grouprl_options.valid_threshold > 0:
            order = getattr(self, "_generation_order", None)  # None: no balancing, rows are in generation order
            assembled, metrics = self._gpg_assembler.assemble(batch, self._generate_round, first_order=order)
            if assembled is not batch:
                if self.config.trainer.balance_batch:
                    self.balance(assembled)  # the DP token balance of the rows trained
                hooks.replace_in_place(batch, assembled)
            self._generation_order = None  # used (and the order of the assembled rows is no round's)
            self._grouprl_metrics.update(metrics)

    def after_old_log_prob(self, batch: DataProto, old_log_prob: DataProto) -> None:
        rows = self._gold_rows
        if rows and "rollout_log_probs" in batch.batch.keys():
            # gold rows were not sampled by the rollout policy: verl's rollout correction (mismatch metrics, IS
            # weights, rejection sampling) treats them as on-policy (ratio 1) instead of as log-prob 0 samples
            batch.batch["rollout_log_probs"][rows] = old_log_prob.batch["old_log_probs"][rows].to(
                batch.batch["rollout_log_probs"].dtype)

    def _inject_gold(self, batch: DataProto) -> tuple[dict[str, float], list[int]]:
        gold_ids = [self._gold_ids(batch, i) for i in range(len(batch))]
        # scored the way fit scores a colocated reward model's batch: verl's reward loop workers, each row
        # through the configured reward manager (DAPO's overlong penalty, sandbox, reward model, ...)
        return hooks.inject_gold(batch, self.grouprl_options, gold_ids, self.score_rows, self.tokenizer.pad_token_id,
                                 self.tokenizer.eos_token_id)

    def _gold_ids(self, batch: DataProto, row: int) -> list[int] | None:
        """Token ids of row ``row``'s rendered reference (:func:`grouprl_core.gold.render_gold`: None when it has
        none, i.e. None or blank), tokenised as the TRL trainer does (no special tokens; EOS is added when fitted)."""
        key = self.grouprl_options.solution_key
        if key in batch.non_tensor_batch:
            solution = batch.non_tensor_batch[key][row]
        else:
            extra = batch.non_tensor_batch.get("extra_info")
            if extra is None or not isinstance(extra[row], dict) or key not in extra[row]:
                raise KeyError(
                    f"algorithm.grouprl.gcpo.solution_key={key!r}: neither a dataset column nor an extra_info key. "
                    "Add the reference solution to your parquet (column or extra_info) or change solution_key."
                )
            solution = extra[row][key]
        if isinstance(solution, np.generic):  # a numpy scalar from a numeric column: its Python value
            solution = solution.item()
        text = render_gold(self.grouprl_options.gold_template, solution)
        return None if text is None else self.tokenizer.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ GPG extra rounds
    def _make_resample_loader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import RandomSampler

        # an order of its own: data.seed + 1, or with data.seed null (verl's default) the seed verl's
        # create_rl_sampler then uses (an unseeded torch.Generator) + 1
        generator = torch.Generator()
        seed = self.config.data.get("seed")
        generator.manual_seed((generator.initial_seed() if seed is None else int(seed)) + 1)
        return StatefulDataLoader(
            self.train_dataset, batch_size=self.train_dataloader.batch_size, drop_last=True,
            sampler=RandomSampler(self.train_dataset, generator=generator),
            collate_fn=self.train_dataloader.collate_fn,
        )

    def _next_resample_batch(self) -> dict:
        """The next batch of the extra-round sampler (a second pass over the training set, in its own order)."""
        if self._resample_loader is None:
            self._resample_loader = self._make_resample_loader()
        for fresh_pass in (False, True):
            if self._resample_iter is None or fresh_pass:
                self._resample_iter = iter(self._resample_loader)
            batch_dict = next(self._resample_iter, None)
            if batch_dict is not None:
                return batch_dict
        raise ValueError(
            f"GPG extra rounds: the training set ({len(self.train_dataset)} rows) holds no full generation batch of "
            f"{self._resample_loader.batch_size} prompts. Use more data, a smaller data.train_batch_size / "
            "data.gen_batch_size, or algorithm.grouprl.gpg.valid_threshold=0."
        )

    def _generate_round(self) -> DataProto:
        """One more generation batch from fresh prompts, scored as fit scores its own.

        Mirrors the non-REMAX generation part of ``RayPPOTrainer.fit`` (verl 0.9.1): uid per prompt,
        ``rollout.n`` interleaved repeats, the agent loop (with its streaming reward), the colocated
        reward model if there is one; plus waking vLLM with the current weights first.
        """
        batch = DataProto.from_single_dict(self._next_resample_batch())
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
        generation = self.generation_inputs(batch)
        generation.meta_info["global_steps"] = self.global_steps
        n = self.config.actor_rollout_ref.rollout.n
        # fit put the replicas to sleep after its generation; for full-weight training vLLM sleeps at level 2,
        # which discards the weights: only update_weights restores them (as RayPPOTrainer._validate does)
        self.checkpoint_manager.update_weights(self.global_steps)
        output = self.async_rollout_manager.generate_sequences(generation.repeat(repeat_times=n, interleave=True))
        self.checkpoint_manager.sleep_replicas()
        output.meta_info.pop("timing", None)
        batch = batch.repeat(repeat_times=n, interleave=True).union(output)
        if "response_mask" not in batch.batch.keys():
            batch.batch["response_mask"] = compute_response_mask(batch)
        if self.use_rm and "rm_scores" not in batch.batch.keys():  # a colocated reward model scores after rollout
            batch = batch.union(self.score_rows(batch))
        return batch

    # ------------------------------------------------------------------ checkpoints
    def after_save_checkpoint(self, folder: str) -> None:
        if self._gpg_assembler is None:
            return
        state = {
            "carry": self._gpg_assembler.carry,
            "resample_loader": None if self._resample_loader is None else self._resample_loader.state_dict(),
        }
        torch.save(state, os.path.join(folder, GPG_STATE_FILE))

    def after_load_checkpoint(self, folder: str) -> None:
        if self._gpg_assembler is None:
            return
        path = os.path.join(folder, GPG_STATE_FILE)
        if not os.path.exists(path):
            print(f"grouprl: no {GPG_STATE_FILE} in {folder}; GPG's carry buffer and extra-round sampler start empty",
                  flush=True)
            return
        state = torch.load(path, weights_only=False)  # written by after_save_checkpoint: a DataProto, loader state
        self._gpg_assembler.carry = state["carry"]
        if state["resample_loader"] is not None:
            self._resample_loader = self._make_resample_loader()
            self._resample_loader.load_state_dict(state["resample_loader"])
            self._resample_iter = None

    # ------------------------------------------------------------------ after advantages, before the update
    def actor_update(self, batch: DataProto, run_update) -> DataProto:
        """grouprl's pre-steps, then verl's actor update (``run_update``), which a batch without signal skips."""
        metrics = dict(getattr(self, "_grouprl_metrics", {}))
        metrics.update(estimators.LAST_METRICS)
        skip = False
        if self.grouprl_algo == "copo":
            metrics.update(hooks.attach_copo_fields(batch, self.grouprl_options))
        elif self.grouprl_algo == "guidance":
            filter_metrics, skip = hooks.guidance_filter(batch, self.grouprl_options)
            metrics.update(filter_metrics)
            if not skip:
                metrics.update(hooks.apply_guidance_weights(batch, self._negative_log_probs(batch), self.grouprl_options))
        elif self.grouprl_algo == "gpg":
            rewards = hooks.outcome_rewards(batch).float()
            skip = bool(zero_variance_mask(rewards, hooks.batch_group_ids(batch, "grouprl_gpg")).all())
        if self.skip_report is not None:
            warning = self.skip_report.step(self.global_steps, skip)
            if warning is not None:
                logger.warning(warning)  # logging, not warnings.warn: a repeated warning must show each time
        if skip:  # no learning signal: no optimizer step at all
            metrics[SKIPPED_UPDATE] = 1.0
            return DataProto.from_single_dict(data={}, meta_info={"metrics": metrics})
        output = run_update(batch)
        output.meta_info["metrics"].update(metrics)
        return output

    def _negative_log_probs(self, batch: DataProto) -> torch.Tensor:
        """Log-probs of the responses behind the negative context, with the current actor.

        Mirrors verl's old log-prob pass (``RayPPOTrainer``, verl 0.9.1) on the rows of
        :func:`grouprl_verl.hooks.negative_context_batch` (their own token counts, no replayed routing).
        """
        from grouprl_core.guidance import build_negative_prompt

        opts = self.grouprl_options
        template_kwargs = dict(self.config.data.get("apply_chat_template_kwargs", {}) or {})
        ids_of: dict[str, list[int]] = {}
        neg_ids = []
        for prompt in batch.non_tensor_batch["raw_prompt"]:
            messages = build_negative_prompt(list(prompt), opts.negative_prompt_type, opts.negative_template)
            key = repr(messages)
            if key not in ids_of:  # each prompt comes rollout.n times: tokenise it once
                out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                         **template_kwargs)
                ids_of[key] = list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
            neg_ids.append(ids_of[key])
        neg = hooks.negative_context_batch(batch, neg_ids, self.tokenizer.pad_token_id)
        td = left_right_2_no_padding(neg.to_tensordict())
        tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
        output = self.actor_rollout_wg.compute_log_prob(td)
        return no_padding_2_padding(tu.get(output, "log_probs"), td).float()
