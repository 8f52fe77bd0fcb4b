"""Every default the two backends share is the same number on both sides, pair by pair.

Each row of :data:`PAIRS` names a TRL config field (or the grouprl_core default the TRL trainer uses
without a field) and the verl key that means the same thing. The TRL side is read from a
constructed config (so ``__post_init__`` resolutions count), the verl side twice: from the shipped
YAML composed over verl's ``ppo_trainer`` (estimator block, actor keys and the clip ranges our
losses read) and, for ``algorithm.grouprl.*`` keys, from the options dataclass a missing block
falls back to. A future drift on either side fails here by name.
"""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("verl")
pytest.importorskip("trl")

from omegaconf import OmegaConf  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

from test_verl_configs import compose_config  # noqa: E402

import grouprl_verl.register  # noqa: E402,F401
from grouprl_core.copo import copo_advantages  # noqa: E402
from grouprl_core.gpg import gpg_advantages  # noqa: E402
from grouprl_core.grpo import GRPO_STD_EPS  # noqa: E402
from grouprl_core.guidance import FILTER_HIGH, FILTER_LOW  # noqa: E402
from grouprl_verl.config import algo_options  # noqa: E402
from grouprl_verl.losses import _clip_ranges  # noqa: E402

ALGOS = ("gpg", "gcpo", "copo", "guidance")


def trl_config(algo):
    from grouprl_trl import COPOConfig, GCPOConfig, GPGConfig
    from grouprl_trl.guidance import GuidanceGCPOConfig

    cls = {"gpg": GPGConfig, "gcpo": GCPOConfig, "copo": COPOConfig, "guidance": GuidanceGCPOConfig}[algo]
    return cls(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


def default_of(func, name):
    return inspect.signature(func).parameters[name].default


# TRL side: a config field name, or (label, function of the config) for a default the trainer uses without a
# field. verl side: a dotted key in the composed config; "actor.clip_low/high/dual" are the clip ranges our
# losses read (grouprl_verl.losses._clip_ranges; verl's gspo reads clip_ratio_low/high the same way).
# convert: maps the TRL value to verl's spelling where the two name one setting differently.
KL_OFF = ("beta", "actor_rollout_ref.actor.use_kl_loss", lambda beta: beta != 0.0)
# optimizer updates per generation batch: TRL steps_per_generation / gradient accumulation; verl train / mini batch
UPDATES = (("updates per generation batch", lambda cfg: cfg.steps_per_generation // cfg.gradient_accumulation_steps),
           "updates_per_step", None)
EPOCHS = ("num_iterations", "actor_rollout_ref.actor.ppo_epochs", None)
AGG = {"dapo": "token-mean", "grpo": "seq-mean-token-mean"}
TRL_GRPO_EPS = ("TRL GRPOTrainer eps (grouprl_core.grpo.GRPO_STD_EPS)", lambda cfg: GRPO_STD_EPS)
PAIRS = {
    "gpg": [
        ("advantage_norm", "algorithm.grouprl.gpg.f_norm", None),
        ("age", "algorithm.grouprl.gpg.use_age", None),
        ("valid_threshold", "algorithm.grouprl.gpg.valid_threshold", None),
        ("max_resample_rounds", "algorithm.grouprl.gpg.max_resample_rounds", None),
        ("carry_over", "algorithm.grouprl.gpg.carry_over", None),
        (("gpg_advantages eps", lambda cfg: default_of(gpg_advantages, "eps")), "algorithm.grouprl.gpg.std_eps", None),
        ("loss_agg_mode", "actor_rollout_ref.actor.loss_agg_mode", None),
        EPOCHS,
        UPDATES,
        KL_OFF,
    ],
    "gcpo": [
        ("gold_template", "algorithm.grouprl.gcpo.gold_template", None),
        ("correct_threshold", "algorithm.grouprl.gcpo.correct_threshold", None),
        ("gold_trigger", "algorithm.grouprl.gcpo.trigger", None),
        ("gold_placement", "algorithm.grouprl.gcpo.placement", None),
        ("reference_column", "algorithm.grouprl.gcpo.solution_key", None),
        (TRL_GRPO_EPS, "algorithm.grouprl.gcpo.eps", None),
        ("scale_rewards", "algorithm.norm_adv_by_std_in_grpo", lambda scale: scale in ("group", True)),
        ("epsilon", "actor.clip_low", None),
        ("epsilon_high", "actor.clip_high", None),
        ("importance_sampling_level", "actor_rollout_ref.actor.policy_loss.loss_mode",
         {"sequence": "gspo", "token": "vanilla"}.get),
        ("loss_type", "actor_rollout_ref.actor.loss_agg_mode", AGG.get),
        EPOCHS,
        UPDATES,
        KL_OFF,
    ],
    "copo": [
        ("gate_k", "algorithm.grouprl.copo.gate_k", None),
        ("gate_b", "algorithm.grouprl.copo.gate_b", None),
        ("blend", "algorithm.grouprl.copo.blend", None),
        ("entropy_reward_coef", "algorithm.grouprl.copo.entropy_reward_coef", None),
        (("copo_advantages eps", lambda cfg: default_of(copo_advantages, "eps")), "algorithm.grouprl.copo.eps", None),
        ("epsilon", "actor.clip_low", None),
        (("epsilon_high (None: epsilon)", lambda cfg: cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high),
         "actor.clip_high", None),
        ("dual_clip", "actor.clip_dual", None),
        ("loss_type", "actor_rollout_ref.actor.loss_agg_mode", AGG.get),
        EPOCHS,
        UPDATES,
        KL_OFF,
    ],
    "guidance": [
        ("rank_x", "algorithm.grouprl.guidance.rank_x", None),
        ("rank_y", "algorithm.grouprl.guidance.rank_y", None),
        ("dynamic_filter", "algorithm.grouprl.guidance.dynamic_filter", None),
        (("dynamic filter low (grouprl_core.guidance.FILTER_LOW)", lambda cfg: FILTER_LOW),
         "algorithm.grouprl.guidance.filter_low", None),
        (("dynamic filter high (grouprl_core.guidance.FILTER_HIGH)", lambda cfg: FILTER_HIGH),
         "algorithm.grouprl.guidance.filter_high", None),
        ("negative_prompt_type", "algorithm.grouprl.guidance.negative_prompt_type", None),
        ("negative_template", "algorithm.grouprl.guidance.negative_template", None),
        (TRL_GRPO_EPS, "algorithm.grouprl.guidance.eps", None),
        ("epsilon", "actor.clip_low", None),
        ("epsilon_high", "actor.clip_high", None),
        ("dual_clip", "actor.clip_dual", None),
        ("entropy_penalty_coef", "actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_coef", None),
        ("loss_type", "actor_rollout_ref.actor.loss_agg_mode", AGG.get),
        EPOCHS,
        UPDATES,
        KL_OFF,
    ],
}
CASES = [(algo, *row) for algo in ALGOS for row in PAIRS[algo]]


def case_id(case):
    algo, trl, verl, _ = case
    return f"{algo}:{trl if isinstance(trl, str) else trl[0]}<->{verl}"


@pytest.fixture(scope="module")
def sides():
    """Per algorithm: the TRL config, the composed verl config and its actor dataclass."""
    out = {}
    for algo in ALGOS:
        composed = compose_config(f"grouprl_{algo}")
        out[algo] = (trl_config(algo), composed, omega_conf_to_dataclass(composed.actor_rollout_ref.actor))
    return out


def verl_value(composed, actor, key):
    if key == "updates_per_step":
        return composed.data.train_batch_size // composed.actor_rollout_ref.actor.ppo_mini_batch_size
    if key.startswith("actor.clip_"):
        low, high, dual = _clip_ranges(actor)
        return {"actor.clip_low": low, "actor.clip_high": high, "actor.clip_dual": dual}[key]
    value = OmegaConf.select(composed, key, throw_on_missing=True)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_trl_and_verl_share_the_default(sides, case):
    algo, trl, verl, convert = case
    trl_cfg, composed, actor = sides[algo]
    trl_value = getattr(trl_cfg, trl) if isinstance(trl, str) else trl[1](trl_cfg)
    expected = convert(trl_value) if convert else trl_value
    assert convert is None or expected is not None, f"{case_id(case)}: no verl spelling for TRL's {trl_value!r}"
    assert verl_value(composed, actor, verl) == expected, f"YAML grouprl_{algo}: {verl}"
    if verl.startswith("algorithm.grouprl."):  # the fallback of a missing block or key
        field = verl.rsplit(".", 1)[1]
        assert getattr(algo_options(None, algo), field) == expected, f"grouprl_verl.config default: {verl}"


def test_every_verl_option_is_paired_or_verl_only():
    """A new ``algorithm.grouprl.<algo>`` key must be added to PAIRS (or here, with the reason it has no TRL twin)."""
    verl_only = {
        "copo": {"answer_key"},  # TRL extracts answers itself (answer_extractor); verl reads the reward's extra
        "guidance": {"accuracy_key"},  # TRL: accuracy_reward names a reward function; verl: a reward_extra_info key
    }
    for algo in ALGOS:
        paired = {v.rsplit(".", 1)[1] for _, v, _ in PAIRS[algo] if v.startswith(f"algorithm.grouprl.{algo}.")}
        fields = set(vars(algo_options(None, algo)))
        assert fields - paired - verl_only.get(algo, set()) == set(), algo
