"""``GroupRLRayPPOTrainer``: verl's legacy ``RayPPOTrainer`` (0.9.1) plus the steps registries cannot do.

It overrides two narrow methods of ``verl.trainer.ppo.ray_trainer.RayPPOTrainer`` that ``fit`` calls
at the right moments, and leaves ``fit`` itself alone:

* ``_compute_old_log_prob(batch)`` (ray_trainer.py:1290) runs after the rewards (``rm_scores``) are
  known and before any log-prob pass. Before delegating to it we
  - GCPO-gold: rewrite one rollout of every all-wrong group with the reference solution and score
    it with the run's reward function (:func:`grouprl_verl.hooks.inject_gold`);
  - GPG with ``valid_threshold > 0``: assemble a batch whose valid-group fraction reaches beta_th
    from extra generation rounds and carried groups (:class:`grouprl_verl.hooks.GPGGroupAssembler`).
  Both write into the batch in place (``fit`` holds references to its tensors and arrays).
* ``_update_actor(batch)`` (ray_trainer.py:1327) runs after ``compute_advantage``. Before delegating:
  - COPO: attach the global advantage and gate per sample (:func:`~grouprl_verl.hooks.attach_copo_fields`);
    ``init_workers`` installed :func:`grouprl_verl.losses.grouprl_ppo_loss` on the actor so the
    ``grouprl_copo`` loss sees them;
  - GCPO-guidance: dynamic filter, one no-grad ``compute_log_prob`` pass of the responses behind the
    negative context, token weights on the advantages (:mod:`grouprl_verl.hooks`);
  - GPG / guidance: a batch without any learning signal skips the update for real (no optimizer
    step, so weight decay does not move the weights either).
  It also logs the grouprl metrics with the actor's.

This code needs verl's GPU workers (vLLM/SGLang rollout, FSDP engine); its pure logic lives in
:mod:`grouprl_verl.hooks` and is tested on CPU.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from functools import partial

import numpy as np
import torch
from verl import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

from grouprl_core.groups import zero_variance_mask

from . import estimators, hooks, losses
from .config import algo_options

ESTIMATOR_TO_ALGO = {
    estimators.GPG: "gpg", estimators.GCPO: "gcpo", estimators.COPO: "copo", estimators.GUIDANCE: "guidance",
}


def grouprl_settings(config) -> tuple[str | None, object]:
    """The grouprl algorithm a composed verl config selects and its validated options.

    Raises ``ValueError`` naming the key and the fix for: the V1 trainer, unknown or bad
    ``algorithm.grouprl.<algo>.*`` keys, COPO without both its estimator and its loss, and
    ``rollout_correction.bypass_mode`` with the hooks that run in ``_compute_old_log_prob``.
    """
    if config.trainer.get("use_v1", True):
        raise ValueError(
            "trainer.use_v1=true: grouprl's hooks extend the legacy DataProto trainer (RayPPOTrainer). "
            "Set trainer.use_v1=false (the grouprl_* configs do)."
        )
    algorithm = config.algorithm
    algo = ESTIMATOR_TO_ALGO.get(str(algorithm.adv_estimator))
    options = algo_options(algorithm, algo) if algo else None
    loss_mode = config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
    if (loss_mode == losses.COPO) != (algo == "copo"):
        raise ValueError(
            f"algorithm.adv_estimator={algorithm.adv_estimator} with actor_rollout_ref.actor.policy_loss.loss_mode="
            f"{loss_mode}: COPO needs both set to grouprl_copo (the loss reads the fields the estimator's hook attaches)."
        )
    bypass = (algorithm.get("rollout_correction") or {}).get("bypass_mode", False)
    if bypass and algo in ("gcpo", "gpg"):
        raise ValueError(
            "algorithm.rollout_correction.bypass_mode=true skips _compute_old_log_prob, where the GCPO-gold and "
            "GPG-threshold hooks run; set it to false."
        )
    return algo, options


class GroupRLRayPPOTrainer(RayPPOTrainer):
    """verl's ``RayPPOTrainer`` with grouprl's hooks; same constructor and ``fit``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grouprl_algo, self.grouprl_options = grouprl_settings(self.config)
        estimator = self.config.algorithm.adv_estimator
        loss_mode = self.config.actor_rollout_ref.actor.policy_loss.get("loss_mode", "vanilla")
        print(f"grouprl: {type(self).__name__}, algorithm={self.grouprl_algo or 'none'} ({estimator} / {loss_mode})",
              flush=True)
        self._gpg_assembler = hooks.GPGGroupAssembler(self.grouprl_options) if self.grouprl_algo == "gpg" else None
        self._resample_iter = None
        self._reward_fn = None

    # ------------------------------------------------------------------ workers
    def init_workers(self):
        super().init_workers()
        if self.grouprl_algo == "copo":
            from verl.utils.config import omega_conf_to_dataclass

            actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
            # mirrors ActorRolloutRefWorker.init_model (engine_workers.py:643): partial(ppo_loss, config=actor_config)
            self.actor_rollout_wg.set_loss_fn(partial(losses.grouprl_ppo_loss, config=actor_config))

    # ------------------------------------------------------------------ after rewards, before old log-probs
    def _compute_old_log_prob(self, batch: DataProto):
        """Mirrors ``RayPPOTrainer._compute_old_log_prob`` (verl 0.9.1) after the grouprl pre-steps."""
        self._grouprl_metrics = {}
        if self.grouprl_algo == "gcpo":
            self._grouprl_metrics.update(self._inject_gold(batch))
        elif self.grouprl_algo == "gpg" and self.grouprl_options.valid_threshold > 0:
            assembled, metrics = self._gpg_assembler.assemble(batch, self._generate_round)
            if assembled is not batch:
                hooks.replace_in_place(batch, assembled)
            self._grouprl_metrics.update(metrics)
        return super()._compute_old_log_prob(batch)

    def _inject_gold(self, batch: DataProto) -> dict[str, float]:
        opts = self.grouprl_options
        gold_ids = [self._gold_ids(batch, i) for i in range(len(batch))]
        return hooks.inject_gold(batch, opts, gold_ids, partial(self._score_row, batch), self.tokenizer.pad_token_id)

    def _gold_ids(self, batch: DataProto, row: int) -> list[int] | None:
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
        if solution is None or str(solution) == "":
            return None
        text = self.grouprl_options.gold_template.format(solution=solution)
        return self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def _score_row(self, batch: DataProto, row: int):
        """Mirrors ``NaiveRewardManager.run_single`` (verl 0.9.1): the configured custom reward function,
        else ``default_compute_score``, on the decoded response."""
        if self._reward_fn is None:
            from verl.trainer.ppo.reward import get_custom_reward_fn
            from verl.utils.reward_score import default_compute_score

            self._reward_fn = get_custom_reward_fn(self.config) or default_compute_score
        length = int(batch.batch["response_mask"][row].sum())
        text = self.tokenizer.decode(batch.batch["responses"][row, :length], skip_special_tokens=True)
        non_tensor = batch.non_tensor_batch
        result = self._reward_fn(
            data_source=non_tensor[self.config.data.reward_fn_key][row],
            solution_str=text,
            ground_truth=non_tensor["reward_model"][row]["ground_truth"],
            extra_info=non_tensor.get("extra_info", [None] * len(batch))[row],
        )
        return asyncio.run(result) if inspect.isawaitable(result) else result

    def _generate_round(self) -> DataProto:
        """One more generation batch from fresh prompts, scored by the reward loop.

        Mirrors the non-REMAX generation part of ``RayPPOTrainer.fit`` (verl 0.9.1, ray_trainer.py:1468-1560),
        drawing prompts from a private dataloader (a second pass over the training set, own order).
        """
        from torchdata.stateful_dataloader import StatefulDataLoader

        if self._resample_iter is None:
            generator = torch.Generator().manual_seed(int(self.config.data.get("seed", 1)) + 1000)
            loader = StatefulDataLoader(
                self.train_dataset, batch_size=self.config.data.train_batch_size, shuffle=True, drop_last=True,
                collate_fn=self.train_dataloader.collate_fn, generator=generator,
            )
            self._resample_iter = iter(loader)
        try:
            batch_dict = next(self._resample_iter)
        except StopIteration:
            self._resample_iter = None
            return self._generate_round()
        batch = DataProto.from_single_dict(batch_dict)
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
        gen_batch = self._get_gen_batch(batch)
        gen_batch.meta_info["global_steps"] = self.global_steps
        n = self.config.actor_rollout_ref.rollout.n
        self.checkpoint_manager.wake_up_replicas()  # fit put them to sleep after its own generation
        output = self.async_rollout_manager.generate_sequences(gen_batch.repeat(repeat_times=n, interleave=True))
        self.checkpoint_manager.sleep_replicas()
        output.meta_info.pop("timing", None)
        batch = batch.repeat(repeat_times=n, interleave=True).union(output)
        if "response_mask" not in batch.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            batch.batch["response_mask"] = compute_response_mask(batch)
        return batch

    # ------------------------------------------------------------------ after advantages, before the update
    def _update_actor(self, batch: DataProto) -> DataProto:
        """Mirrors ``RayPPOTrainer._update_actor`` (verl 0.9.1) after the grouprl pre-steps; may skip it."""
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
        if skip:  # no learning signal: no optimizer step at all
            metrics["grouprl/skipped_update"] = 1.0
            return DataProto.from_single_dict(data={}, meta_info={"metrics": metrics})
        output = super()._update_actor(batch)
        output.meta_info["metrics"].update(metrics)
        return output

    def _negative_log_probs(self, batch: DataProto) -> torch.Tensor:
        """Log-probs of the responses behind the negative context, with the current actor.

        Mirrors ``RayPPOTrainer._compute_old_log_prob`` (verl 0.9.1) on the rows of
        :func:`grouprl_verl.hooks.negative_context_batch`.
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
