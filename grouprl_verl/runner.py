"""``GroupRLTaskRunner``: the Ray task runner of ``python -m grouprl_verl.main_ppo``.

verl's launcher (``verl.trainer.main_ppo.run_ppo``) starts a task runner as a Ray actor and calls
its ``run(config)``, which builds the datasets, the trainer and its workers, then trains. verl's
own ``main_ppo_v0.TaskRunner.run`` constructs ``RayPPOTrainer`` by name. This runner is a copy of
that method (verl 0.9.1, ``main_ppo_v0.py:164``) that constructs
:class:`grouprl_verl.trainer.GroupRLRayPPOTrainer` instead, on verl's ``BaseTaskRunner`` (which
chooses the worker classes and resource pools).

The class lives in its own importable module, not in ``main_ppo`` (which runs as ``__main__``):
Ray then pickles it by reference, so the actor runs exactly this code. (A subclass of verl's
``@ray.remote TaskRunner`` would be pickled by value together with verl's ``run``, whose module
globals a patch in the actor process never reaches.)
"""

from __future__ import annotations

import os
import socket
from pprint import pprint

from omegaconf import OmegaConf

from ._compat import (
    BaseTaskRunner,
    create_rl_dataset,
    create_rl_sampler,
    need_critic,
    need_reference_policy,
    omega_conf_to_dataclass,
    rl_collate_fn,
    validate_config,
)


class GroupRLTaskRunner(BaseTaskRunner):
    """verl's legacy ``TaskRunner`` whose ``run`` builds ``GroupRLRayPPOTrainer``; ``self.trainer`` after ``run``."""

    trainer = None

    def run(self, config):
        """Mirrors ``verl.trainer.main_ppo_v0.TaskRunner.run`` (verl 0.9.1) with grouprl's trainer."""
        from .trainer import GroupRLRayPPOTrainer

        print(f"GroupRLTaskRunner hostname: {socket.gethostname()}, PID: {os.getpid()}")
        pprint(OmegaConf.to_container(config, resolve=True))
        OmegaConf.resolve(config)

        actor_rollout_cls, ray_worker_group_cls = self.add_actor_rollout_worker(config)
        self.add_critic_worker(config)
        self.add_reward_model_resource_pool(config)
        self.add_teacher_model_resource_pool(config)
        self.add_ref_policy_worker(config, actor_rollout_cls)

        validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))

        model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        tokenizer, processor = model_config.tokenizer, model_config.processor
        resource_pool_manager = self.init_resource_pool_mgr(config)

        train_dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer, processor, is_train=True,
                                          max_samples=config.data.get("train_max_samples", -1))
        val_dataset = create_rl_dataset(config.data.val_files, config.data, tokenizer, processor, is_train=False,
                                        max_samples=config.data.get("val_max_samples", -1))
        train_sampler = create_rl_sampler(config.data, train_dataset)

        self.trainer = GroupRLRayPPOTrainer(
            config=config,
            tokenizer=tokenizer,
            processor=processor,
            role_worker_mapping=self.role_worker_mapping,
            resource_pool_manager=resource_pool_manager,
            ray_worker_group_cls=ray_worker_group_cls,
            train_dataset=train_dataset,
            val_dataset=val_dataset,
            collate_fn=rl_collate_fn,
            train_sampler=train_sampler,
        )
        self.trainer.init_workers()
        self.trainer.fit()
