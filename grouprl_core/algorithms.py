"""The algorithms grouprl ships, in one table: name, paper, and the names each backend knows them by.

Plain strings only (no torch, TRL or verl import), so the CLI can read it. The demo and the
benchmarks take their algorithm keys, labels and TRL classes from here, the recipes their verl
keys, the verl trainer its estimator names; ``tests/test_algorithm_table.py`` checks every name
against TRL's classes, verl's registries, grouprl_verl's Hydra configs and the README tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names


@dataclass(frozen=True)
class Paper:
    authors: str
    title: str
    arxiv: str  # arXiv id
    venue: str | None = None

    @property
    def citation(self) -> str:
        """As the README's table writes it: ``Chu et al., *Title*, arXiv 2504.02546 (ICLR 2026)``."""
        text = f"{self.authors}, *{self.title}*, arXiv {self.arxiv}"
        return f"{text} ({self.venue})" if self.venue else text


@dataclass(frozen=True)
class VerlKeys:
    adv_estimator: str  # algorithm.adv_estimator
    loss_mode: str  # actor_rollout_ref.actor.policy_loss.loss_mode
    config_name: str  # Hydra config: grouprl_verl/configs/<config_name>.yaml, or verl's ppo_trainer
    params: str | None  # the options block algorithm.grouprl.<params>.* (None: the algorithm has none)
    module: str = "grouprl_verl.main_ppo"  # the entry point, run with python -m


@dataclass(frozen=True)
class Algorithm:
    key: str  # demo --algo, bench --algos and the verl recipes' ``algorithm``
    label: str  # the name the paper uses
    paper: Paper
    trl_module: str  # where the TRL trainer and config classes live
    trl_trainer: str
    trl_config: str
    verl: VerlKeys
    # the logged metric with the mean reward of the completions the policy generated, comparable across
    # algorithms (TRL's "reward" is GCPO-gold's batch with the injected gold rows, GPG's trained batch,
    # which its threshold fills with valid groups)
    policy_reward_metric: str = "reward"


ALGORITHMS: dict[str, Algorithm] = {
    "gpg": Algorithm(
        "gpg", "GPG",
        Paper("Chu et al.", "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning", "2504.02546",
              "ICLR 2026"),
        "grouprl_trl.gpg", "GPGTrainer", "GPGConfig",
        VerlKeys("grouprl_gpg", "grouprl_pg", "grouprl_gpg", "gpg"),
        policy_reward_metric=names.GPG_ALL_ROUNDS + "reward",
    ),
    "gcpo_gold": Algorithm(
        "gcpo_gold", "GCPO-gold",
        Paper("Wu & Liu", "Group Contrastive Policy Optimization: When Contrast Fails, Go Gold", "2510.07790"),
        "grouprl_trl.gcpo", "GCPOTrainer", "GCPOConfig",
        VerlKeys("grouprl_gcpo", "gspo", "grouprl_gcpo", "gcpo"),  # verl's own GSPO loss
        policy_reward_metric=names.GOLD_SAMPLED_REWARD_MEAN,
    ),
    "copo": Algorithm(
        "copo", "COPO",
        Paper("Han et al.", "COPO: Consistency-Aware Policy Optimization", "2508.04138"),
        "grouprl_trl.copo", "COPOTrainer", "COPOConfig",
        VerlKeys("grouprl_copo", "grouprl_copo", "grouprl_copo", "copo"),
    ),
    "guidance": Algorithm(
        "guidance", "GCPO-guidance",
        Paper("Li et al.", "Guidance Contrastive Token Credit Assignment for Discrete Policy Optimization",
              "2605.29198"),
        "grouprl_trl.guidance", "GuidanceGCPOTrainer", "GuidanceGCPOConfig",
        VerlKeys("grouprl_guidance", "grouprl_guidance", "grouprl_guidance", "guidance"),
    ),
}

#: The baseline: TRL's own trainer, and verl's own estimator, loss, config and entry point.
GRPO = Algorithm(
    "grpo", "GRPO",
    Paper("Shao et al.", "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
          "2402.03300"),
    "trl", "GRPOTrainer", "GRPOConfig",
    VerlKeys("grpo", "vanilla", "ppo_trainer", None, module="verl.trainer.main_ppo"),
)


def by_verl_estimator(adv_estimator: str) -> Algorithm | None:
    """The grouprl algorithm whose verl advantage estimator is ``adv_estimator`` (None for verl's own)."""
    return next((a for a in ALGORITHMS.values() if a.verl.adv_estimator == adv_estimator), None)


__all__ = ["ALGORITHMS", "GRPO", "Algorithm", "Paper", "VerlKeys", "by_verl_estimator"]
