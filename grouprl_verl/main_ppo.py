"""``python -m grouprl_verl.main_ppo --config-name grouprl_<algo> [overrides]``: verl's PPO entry point
with grouprl's trainer.

Mirrors ``verl.trainer.main_ppo.main`` (verl 0.9.1) for the legacy trainer (``trainer.use_v1=false``):
same Hydra config tree (our YAMLs in ``grouprl_verl/configs/`` extend verl's ``ppo_trainer``), same
``run_ppo``. Two differences:

* the task runner is :class:`grouprl_verl.runner.GroupRLTaskRunner`, whose ``run`` constructs
  :class:`grouprl_verl.trainer.GroupRLRayPPOTrainer` (it logs ``grouprl: GroupRLRayPPOTrainer,
  algorithm=...`` when it does);
* grouprl's config checks (unknown ``algorithm.grouprl.*`` keys, bad values, unsupported
  combinations) run here in the driver, before Ray starts or asks for GPUs.

The configs ship inside this package (``grouprl_verl/configs``; ``configs/verl`` in the repository is
a link to them), so editable and regular installs find them; ``--config-path DIR`` points Hydra at
your own copies.
"""

from __future__ import annotations

import os

import hydra

# package data, so an installed wheel finds them too (configs/verl_algorithms in the repository links here)
CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def check_config(config) -> None:
    """grouprl's checks of a composed config (raises ``ValueError`` naming the key and the fix)."""
    from .trainer import grouprl_settings

    grouprl_settings(config)


def run(config) -> None:
    """What ``main`` does with the composed config; mirrors ``verl.trainer.main_ppo.main``."""
    import ray
    from verl.trainer.main_ppo import run_ppo

    from ._compat import auto_set_device, need_critic, need_reference_policy, validate_config
    from .runner import GroupRLTaskRunner

    check_config(config)
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    # the verl.plugins entry point registers grouprl in every process; this also covers a checkout
    # used through PYTHONPATH without `pip install -e .` (must be set before ray.init)
    os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "grouprl_verl.register")
    run_ppo(config, task_runner_class=ray.remote(GroupRLTaskRunner))


@hydra.main(config_path=CONFIG_PATH, config_name="grouprl_gpg", version_base=None)
def main(config):
    run(config)


if __name__ == "__main__":
    main()
