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
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

# ``RayPPOTrainer`` methods grouprl overrides (O) or calls (C), with their parameter names in verl 0.9.1.
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
    "verl.trainer.ppo.ray_trainer:RayPPOTrainer.fit": ("grouprl_verl.trainer.GroupRLRayPPOTrainer", "2cd5b737f76215aa"),
    "verl.trainer.ppo.ray_trainer:RayPPOTrainer._load_checkpoint": ("grouprl_verl.trainer.checkpoint_folder",
                                                                   "23626f03573e151c"),
}


def gen_batch(trainer: RayPPOTrainer, batch):
    """``RayPPOTrainer._get_gen_batch``: the generation inputs of ``batch`` (pops them from it)."""
    return trainer._get_gen_batch(batch)


__all__ = [
    "BaseTaskRunner",
    "MIRRORED",
    "RayPPOTrainer",
    "SUPPORTED_VERL_VERSIONS",
    "TRAINER_METHODS",
    "compute_response_mask",
    "create_rl_dataset",
    "create_rl_sampler",
    "find_latest_ckpt_path",
    "gen_batch",
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
