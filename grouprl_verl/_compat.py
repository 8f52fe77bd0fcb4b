"""The one module of grouprl_verl that touches verl's internals.

grouprl extends verl's legacy trainer (``trainer.use_v1=false``): it subclasses
``RayPPOTrainer``, overrides some of its private methods, mirrors its ``TaskRunner``, and reuses
helpers from internal modules (``main_ppo_v0``, padding and TensorDict utilities). None of that is
a stable verl API, so every such name is imported here, once, and checked against the verl version
this code was written for. ``tests/test_verl_compat.py`` pins the signatures (and, for the code we
mirror, the source) of everything listed below, so an upgrade fails by name instead of at run time.
"""

from __future__ import annotations

import verl

SUPPORTED_VERL_VERSIONS = ("0.9.1",)

if verl.__version__ not in SUPPORTED_VERL_VERSIONS:
    raise ImportError(
        f"grouprl_verl supports verl {', '.join(SUPPORTED_VERL_VERSIONS)}, found verl {verl.__version__}: it "
        "extends verl's legacy RayPPOTrainer through private methods whose signatures change between releases. "
        "Install a supported version (pip install 'verl==0.9.1') or update grouprl_verl/_compat.py and the "
        "contract test tests/test_verl_compat.py."
    )

# internal modules and helpers (verl 0.9.1 paths)
from verl.trainer.main_ppo_v0 import BaseTaskRunner  # noqa: E402
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_response_mask  # noqa: E402
from verl.trainer.ppo.utils import (  # noqa: E402
    create_rl_dataset,
    create_rl_sampler,
    need_critic,
    need_reference_policy,
)
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.utils.dataset.rl_dataset import collate_fn as rl_collate_fn  # noqa: E402
from verl.utils.device import auto_set_device  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

# ``RayPPOTrainer`` methods RayPPOTrainerHooks overrides (O) or calls (C), with their parameter names in verl 0.9.1.
TRAINER_METHODS = {
    "__init__": ("self", "config", "tokenizer", "role_worker_mapping", "resource_pool_manager", "ray_worker_group_cls",
                 "processor", "train_dataset", "val_dataset", "collate_fn", "train_sampler", "device_name"),  # O
    "init_workers": ("self",),  # O
    "_balance_batch": ("self", "batch", "metrics", "logging_prefix", "keep_minibatch"),  # O, C
    "_compute_reward_colocate": ("self", "batch"),  # O, C
    "_compute_old_log_prob": ("self", "batch"),  # O
    "_update_actor": ("self", "batch"),  # O
    "_get_gen_batch": ("self", "batch"),  # C
    "_save_checkpoint": ("self",),  # O
    "_load_checkpoint": ("self",),  # O
}

# verl code that grouprl mirrors (copies the order of calls of): upstream function -> (our code, sha256[:16] of
# its verl 0.9.1 source). A change upstream needs a review of our copy, then a new hash.
MIRRORED = {
    "verl.trainer.main_ppo_v0:TaskRunner.run": ("grouprl_verl.runner.GroupRLTaskRunner.run", "95ebfb4a9286d46a"),
    # the generation part (extra GPG rounds), the order extract_reward -> _compute_old_log_prob ->
    # non_tensor_batch.update -> _update_actor the hooks rely on, where fit sleeps / syncs vLLM
    "verl.trainer.ppo.ray_trainer:RayPPOTrainer.fit": (
        "grouprl_verl._compat.RayPPOTrainerHooks and grouprl_verl.trainer.GroupRLRayPPOTrainer._generate_round",
        "2cd5b737f76215aa"),
    "verl.trainer.ppo.ray_trainer:RayPPOTrainer._load_checkpoint": ("grouprl_verl._compat.checkpoint_folder",
                                                                   "23626f03573e151c"),
}


def checkpoint_folder(config, global_steps: int) -> str:
    """The ``global_step_N`` folder ``RayPPOTrainer._load_checkpoint`` (verl 0.9.1) resumed from."""
    import os

    if config.trainer.resume_mode == "resume_path":
        folder = config.trainer.resume_from_path
    else:
        folder = os.path.join(config.trainer.default_local_dir, f"global_step_{global_steps}")
    return folder if os.path.isabs(folder) else os.path.join(os.getcwd(), folder)


class RayPPOTrainerHooks(RayPPOTrainer):
    """verl's legacy ``RayPPOTrainer`` with the private steps ``fit`` calls exposed as named hooks.

    ``fit`` (verl 0.9.1) runs, per step: generation -> sleep vLLM -> ``_balance_batch`` -> [colocated
    reward model: ``_compute_reward_colocate``] -> ``extract_reward`` (takes references to ``rm_scores``
    and the reward-extra arrays) -> ``_compute_old_log_prob`` -> ... -> ``compute_advantage`` ->
    ``non_tensor_batch.update(extras)`` -> ``_update_actor`` -> [``_save_checkpoint``] ->
    ``update_weights``. This class is the only place in grouprl that overrides or calls those private
    methods; :class:`grouprl_verl.trainer.GroupRLRayPPOTrainer` implements the hooks.
    """

    # ------------------------------------------------------------------ hooks (no-ops here)
    def before_balance(self, batch) -> None:
        """``batch`` in generation order, just before ``_balance_batch`` reorders it."""

    def prepare_rewards(self, data) -> None:
        """``data`` holds reward fields ``fit`` will read next (the step's batch, a reward model's output)."""

    def before_old_log_prob(self, batch) -> None:
        """After rewards, before the old log-prob pass; ``batch`` must be changed in place."""

    def after_old_log_prob(self, batch, old_log_prob) -> None:
        """``old_log_prob`` (a DataProto with ``old_log_probs``) is known; ``fit`` unions it next."""

    def actor_update(self, batch, run_update):
        """After the advantages; ``run_update(batch)`` is verl's update (returns its metrics DataProto)."""
        return run_update(batch)

    def after_save_checkpoint(self, folder: str) -> None:
        """verl wrote ``global_step_N`` into ``folder``."""

    def after_load_checkpoint(self, folder: str) -> None:
        """verl resumed from ``folder``."""

    # ------------------------------------------------------------------ verl's steps grouprl calls
    def generation_inputs(self, batch):
        """``_get_gen_batch``: the generation inputs of ``batch`` (pops them from it)."""
        return self._get_gen_batch(batch)

    def score_rows(self, batch):
        """``_compute_reward_colocate``: ``batch`` scored by verl's reward loop (configured reward manager)."""
        return self._compute_reward_colocate(batch)

    def balance(self, batch) -> None:
        """``_balance_batch``: reorder ``batch`` in place for an even token load across DP ranks."""
        self._balance_batch(batch, metrics={})

    # ------------------------------------------------------------------ verl's private steps -> hooks
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        self.before_balance(batch)
        self.prepare_rewards(batch)
        return super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    def _compute_reward_colocate(self, batch):
        result = super()._compute_reward_colocate(batch)
        self.prepare_rewards(result)
        return result

    def _compute_old_log_prob(self, batch):
        self.before_old_log_prob(batch)
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        self.after_old_log_prob(batch, old_log_prob)
        return old_log_prob, mfu

    def _update_actor(self, batch):
        return self.actor_update(batch, super()._update_actor)

    def _save_checkpoint(self):
        import os

        super()._save_checkpoint()
        self.after_save_checkpoint(os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}"))

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        if self.global_steps > 0:  # verl resumed (it leaves global_steps at 0 otherwise)
            self.after_load_checkpoint(checkpoint_folder(self.config, self.global_steps))
        return result


__all__ = [
    "BaseTaskRunner",
    "auto_set_device",
    "MIRRORED",
    "RayPPOTrainer",
    "SUPPORTED_VERL_VERSIONS",
    "TRAINER_METHODS",
    "compute_response_mask",
    "create_rl_dataset",
    "create_rl_sampler",
    "find_latest_ckpt_path",
    "RayPPOTrainerHooks",
    "checkpoint_folder",
    "left_right_2_no_padding",
    "need_critic",
    "need_reference_policy",
    "no_padding_2_padding",
    "omega_conf_to_dataclass",
    "ppo_loss",
    "rl_collate_fn",
    "tu",
    "validate_config",
]
