"""One table of every algorithm the benchmarks can run.

Adding an algorithm is one ``AlgoSpec`` entry: where its trainer/config classes live and the
config fields that make it that algorithm. The four grouprl algorithms take their label and classes
from :data:`grouprl_core.algorithms.ALGORITHMS`; the TRL baselines and the study variants are
settings added here. Classes are imported lazily, so a benchmark still
runs when a trainer is missing from this checkout (e.g. on a branch without
``grouprl_trl.gcpo``); :func:`load` then raises :class:`AlgorithmUnavailable` with the reason
and the benchmark prints a "not available" row instead of a number.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from grouprl_core.algorithms import ALGORITHMS as GROUPRL_ALGORITHMS

REPO_ROOT = Path(__file__).resolve().parent.parent


class AlgorithmUnavailable(RuntimeError):
    """The algorithm's trainer cannot be imported in this checkout."""


@dataclass(frozen=True)
class AlgoSpec:
    label: str
    module: str  # where trainer/config live
    trainer: str
    config: str
    fields: dict = field(default_factory=dict)  # config fields that define the algorithm
    needs_solution: bool = False  # reads the dataset's ``solution`` column itself
    # logged metric holding the policy's own reward (TRL's "reward" of GCPO-gold includes the injected gold rows)
    reward_key: str = "reward"
    variant: bool = False  # a setting of another entry's trainer for a study; not part of --algos all


def grouprl_spec(key: str, label: str | None = None, **kwargs) -> AlgoSpec:
    """An entry for an algorithm of :data:`grouprl_core.algorithms.ALGORITHMS` (its label unless ``label``)."""
    algo = GROUPRL_ALGORITHMS[key]
    return AlgoSpec(label or algo.label, algo.trl_module, algo.trl_trainer, algo.trl_config,
                    reward_key=algo.policy_reward_metric, **kwargs)


def gpg_variant(label: str, fields: dict) -> AlgoSpec:
    return grouprl_spec("gpg", label, fields=fields, variant=True)


ALGORITHMS: dict[str, AlgoSpec] = {
    # TRL baselines. TRL 1.16's default loss_type is "dapo"; "grpo" here is the original GRPO
    # loss (per-sequence token mean, loss_type="grpo"), so that GRPO and DAPO are different rows.
    "grpo": AlgoSpec("GRPO (TRL, beta 0)", "trl", "GRPOTrainer", "GRPOConfig", {"beta": 0.0, "loss_type": "grpo"}),
    "grpo_kl": AlgoSpec("GRPO (TRL, beta 0.04)", "trl", "GRPOTrainer", "GRPOConfig",
                        {"beta": 0.04, "loss_type": "grpo"}),
    "dr_grpo": AlgoSpec("Dr. GRPO (TRL)", "trl", "GRPOTrainer", "GRPOConfig",
                        {"beta": 0.0, "loss_type": "dr_grpo", "scale_rewards": "none"}),
    "dapo": AlgoSpec("DAPO loss (TRL)", "trl", "GRPOTrainer", "GRPOConfig", {"beta": 0.0, "loss_type": "dapo"}),
    # grouprl: the four algorithms of grouprl_core.algorithms; each curve reads the table's policy_reward_metric
    # (GPG: every completion generated, not the trained batch its threshold fills with valid groups)
    "gpg": grouprl_spec("gpg"),
    # GPG variants for the resampling-cost study (issue 14): cheaper ways to reach beta_th, and no beta_th at all
    "gpg_missing": gpg_variant("GPG, missing_only rounds", {"resample_strategy": "missing_only"}),
    "gpg_expected": gpg_variant("GPG, expected rounds", {"resample_strategy": "expected"}),
    "gpg_th03": gpg_variant("GPG, beta_th 0.3", {"valid_threshold": 0.3}),
    "gpg_th0": gpg_variant("GPG, no beta_th", {"valid_threshold": 0.0}),
    "gpg_th03_missing": gpg_variant("GPG, beta_th 0.3, missing_only rounds",
                                    {"valid_threshold": 0.3, "resample_strategy": "missing_only"}),
    "gpg_nocarry": gpg_variant("GPG, no carry-over (official)", {"carry_over": False}),
    "gpg_1round": gpg_variant("GPG, at most 1 extra round", {"max_resample_rounds": 1}),
    "gcpo_gold": grouprl_spec("gcpo_gold", fields={"gold_template": "{solution}"}, needs_solution=True),
    "copo": grouprl_spec("copo", fields={"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"}),
    "guidance": grouprl_spec("guidance"),
}


def parse_algos(text: str, default: list[str]) -> list[str]:
    """``--algos`` value: comma-separated keys of :data:`ALGORITHMS`, 'all' (every algorithm, without the
    study variants), 'gpg_variants' (GPG and its variants), or '' for ``default``."""
    if not text:
        return list(default)
    if text == "all":
        return [k for k, spec in ALGORITHMS.items() if not spec.variant]
    names = []
    for part in (a.strip() for a in text.split(",") if a.strip()):
        names += [k for k in ALGORITHMS if k == "gpg" or k.startswith("gpg_")] if part == "gpg_variants" else [part]
    unknown = [a for a in names if a not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"--algos: unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)} or 'all'")
    return names


def load(name: str):
    """``(trainer_cls, config_cls, fields)`` for an algorithm, or :class:`AlgorithmUnavailable`."""
    spec = ALGORITHMS[name]
    try:
        module = importlib.import_module(spec.module)
        trainer, config = getattr(module, spec.trainer), getattr(module, spec.config)
    except (ImportError, AttributeError) as err:
        raise AlgorithmUnavailable(f"{spec.label}: {spec.module}.{spec.trainer} not importable ({err})") from err
    source = Path(getattr(module, "__file__", "") or "").resolve()
    if spec.module.startswith("grouprl") and REPO_ROOT not in source.parents:
        # e.g. an editable install of another checkout filling in a module this checkout lacks
        raise AlgorithmUnavailable(f"{spec.label}: {spec.module} comes from {source}, outside this checkout {REPO_ROOT}")
    return trainer, config, dict(spec.fields)
