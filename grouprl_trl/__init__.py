"""grouprl_trl: TRL trainers for GPG, GCPO-gold, COPO and GCPO-guidance.

Each trainer subclasses ``trl.GRPOTrainer`` (through :class:`grouprl_trl.base.GroupRLTrainer`) and
each config ``trl.GRPOConfig``: swap the two class names in a TRL script and nothing else changes.
Supported TRL versions: >=1.14.2, <1.17, not 1.15.x (checked at import by :mod:`grouprl_trl._compat`,
the one module that touches TRL's private API).
"""

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
]
