"""grouprl_trl: TRL trainers for GPG, GCPO-gold, COPO and GCPO-guidance.

Each trainer subclasses ``trl.GRPOTrainer`` (through :class:`grouprl_trl.base.GroupRLTrainer`) and
each config ``trl.GRPOConfig``: swap the two class names in a TRL script and nothing else changes.
Supported TRL versions: >=1.14.2, <1.17, not 1.15.x (checked at import by :mod:`grouprl_trl._compat`,
the one module that touches TRL's private API).
"""

import importlib

from grouprl_core.algorithms import ALGORITHMS, GRPO

from .copo import COPOConfig, COPOTrainer
from .gcpo import GCPOConfig, GCPOTrainer
from .gpg import GPGConfig, GPGTrainer
from .guidance import GuidanceGCPOConfig, GuidanceGCPOTrainer

__all__ = [
    "COPOConfig",
    "COPOTrainer",
    "GCPOConfig",
    "GCPOTrainer",
    "GPGConfig",
    "GPGTrainer",
    "GuidanceGCPOConfig",
    "GuidanceGCPOTrainer",
    "trl_classes",
]


def trl_classes(key: str) -> tuple[type, type]:
    """``(trainer class, config class)`` of an algorithm of :data:`grouprl_core.algorithms.ALGORITHMS` by its key
    (``gpg``, ``gcpo_gold``, ...), or TRL's own ``GRPOTrainer`` / ``GRPOConfig`` for ``grpo``."""
    algo = GRPO if key == GRPO.key else ALGORITHMS.get(key)
    if algo is None:
        raise ValueError(f"unknown algorithm {key!r}; choose from {[GRPO.key, *ALGORITHMS]}")
    module = importlib.import_module(algo.trl_module)
    return getattr(module, algo.trl_trainer), getattr(module, algo.trl_config)
