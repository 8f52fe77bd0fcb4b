"""Reliability of the trainers: checkpoint/resume, faulty reward functions and data, long
runs of zero-variance batches, and config validation (tiny model, CPU, a few steps each)."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import tiny_trainer_kwargs

from grouprl_trl import (
    COPOConfig,
    COPOTrainer,
    GCPOConfig,
    GCPOTrainer,
    GPGConfig,
    GPGTrainer,
    GuidanceGCPOConfig,
    GuidanceGCPOTrainer,
)
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def params_of(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_finite(trainer):
    for n, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), f"non-finite values in {n}"


# ----------------------------------------------------------------------------- checkpoint / resume
def often_valid_reward(prompts, completions, **kwargs):
    """Prompts with a digit < 3: 0.0 for every completion (zero-variance group). Otherwise 1.0 when
    the completion's first character is a letter, else 0.0 (usually a valid group). With 4 groups
    per batch and beta_th = 1, a batch usually needs more rounds, whose extra valid groups are
    carried over to the next batch."""
    return [float(int(p[1]) >= 3 and c[:1].isalpha()) for p, c in zip(prompts, completions, strict=True)]


def _gpg_resume_trainer(out_dir, **overrides):
    tok = build_tokenizer()
    fields = dict(max_steps=5, per_device_train_batch_size=16, valid_threshold=1.0, learning_rate=1e-2,
                  save_strategy="steps", save_steps=1)
    args = GPGConfig(**tiny_trainer_kwargs(out_dir, **{**fields, **overrides}))
    return GPGTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=often_valid_reward, args=args,
                      train_dataset=build_toy_dataset(num_rows=64, seed=0), processing_class=tok)


def test_gpg_resume_restores_carry_buffer_and_matches_uninterrupted_run(tmp_path):
    full = _gpg_resume_trainer(tmp_path / "full")
    full.train()
    # the case under test: a checkpoint written while valid groups waited in the carry buffer
    with_carry = [
        step for step in range(1, 5)
        if torch.load(tmp_path / "full" / f"checkpoint-{step}" / "gpg_state_rank0.pt", weights_only=True)["carry"]
        is not None
    ]
    assert with_carry, f"no checkpoint with carried groups; carried_frac per step: {logged(full, 'gpg/carried_frac')}"
    step = with_carry[0]

    resumed = _gpg_resume_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{step}"))
    assert resumed.state.global_step == 5
    # the log history up to the checkpoint comes from trainer_state.json; the steps after it are
    # the resumed run's own and must equal the uninterrupted run's: same carried groups, rewards, weights
    assert len(logged(resumed, "reward")) == 5
    assert logged(resumed, "gpg/carried_frac") == logged(full, "gpg/carried_frac")
    assert logged(resumed, "gpg/carried_frac")[step] > 0  # the restored buffer was used right away
    assert logged(resumed, "reward") == logged(full, "reward")
    assert logged(resumed, "gpg/resample_rounds") == logged(full, "gpg/resample_rounds")
    final_full, final_resumed = params_of(full), params_of(resumed)
    for n in final_full:
        assert torch.equal(final_full[n], final_resumed[n]), n


def test_gpg_resume_from_a_checkpoint_without_gpg_state_is_an_error(tmp_path):
    first = _gpg_resume_trainer(tmp_path / "a", max_steps=1)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    (checkpoint / "gpg_state_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="gpg_state_rank0.pt"):
        _gpg_resume_trainer(tmp_path / "b").train(resume_from_checkpoint=str(checkpoint))


# ----------------------------------------------------------------------------- faulty rewards and data
TRAINERS = {  # every trainer refuses faulty rewards the same way (one policy, in grouprl_trl.base)
    "gpg": (GPGTrainer, GPGConfig, {"valid_threshold": 0.0}),
    "gcpo": (GCPOTrainer, GCPOConfig, {}),
    "gcpo_append": (GCPOTrainer, GCPOConfig, {"gold_placement": "append"}),
    "copo": (COPOTrainer, COPOConfig, {"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"}),
    "guidance": (GuidanceGCPOTrainer, GuidanceGCPOConfig, {}),
}


def make_trainer(name, tmp_path, reward, data=None, **overrides):
    trainer_cls, config_cls, fields = TRAINERS[name]
    tok = build_tokenizer()
    args = config_cls(**tiny_trainer_kwargs(tmp_path, **{**fields, **overrides}))
    return trainer_cls(model=build_tiny_model(tok, seed=0), reward_funcs=reward, args=args,
                       train_dataset=data if data is not None else build_toy_dataset(num_rows=32),
                       processing_class=tok)


def exploding_reward(completions, **kwargs):
    return [1.0 / 0 for _ in completions]


def infinite_reward(completions, **kwargs):
    return [float("inf") if i == 1 else float(i % 2) for i in range(len(completions))]


def none_reward(completions, **kwargs):
    return [None if i == 2 else float(i % 2) for i in range(len(completions))]


def short_reward(completions, **kwargs):
    return [0.0, 1.0]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_reward_function_that_raises_is_named(tmp_path, name):
    # GCPO-guidance's filter needs its accuracy reward named when there are several reward functions
    named = {"accuracy_reward": "exploding_reward"} if name == "guidance" else {}
    trainer = make_trainer(name, tmp_path, [lambda completions, **kw: [0.0] * len(completions), exploding_reward],
                           **named)
    before = params_of(trainer)
    with pytest.raises(ZeroDivisionError) as info:  # the original exception type is kept ...
        trainer.train()
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "exploding_reward" in notes  # ... with a note naming the function that raised
    assert all(torch.equal(before[n], p) for n, p in params_of(trainer).items())


@pytest.mark.parametrize("name", list(TRAINERS))
@pytest.mark.parametrize("reward", [infinite_reward, none_reward], ids=["inf", "none"])
def test_non_finite_reward_is_a_clear_error_before_any_update(tmp_path, name, reward):
    trainer = make_trainer(name, tmp_path, reward)
    before = params_of(trainer)
    with pytest.raises(ValueError, match=reward.__name__):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in params_of(trainer).items())
    assert_finite(trainer)


def test_partially_scored_row_stays_allowed(tmp_path):
    """TRL's convention: None from one function is fine when another function scored the row."""
    trainer = make_trainer("gpg", tmp_path, [none_reward, lambda completions, **kw: [0.5] * len(completions)],
                           max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1
    assert_finite(trainer)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_reward_of_wrong_length_is_named(tmp_path, name):
    trainer = make_trainer(name, tmp_path, short_reward)
    with pytest.raises(ValueError, match="short_reward.*returned 2 rewards"):
        trainer.train()


def test_gpg_many_zero_variance_steps_in_a_row_skip_and_leave_weights_alone(tmp_path):
    def constant_reward(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = make_trainer("gpg", tmp_path, constant_reward, max_steps=5, weight_decay=0.1)
    before = params_of(trainer)
    trainer.train()
    assert trainer.state.global_step == 5
    assert logged(trainer, "gpg/skipped_step") == [1.0] * 5
    assert logged(trainer, "gpg/alpha") == []  # a skipped step has no step size to log (issue 12 item 7)
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))
    for n, p in params_of(trainer).items():
        assert torch.equal(before[n], p), n


def test_missing_dataset_column_for_a_reward_names_the_function(tmp_path):
    from grouprl_trl.tiny import toy_reward

    data = build_toy_dataset(num_rows=32).remove_columns("solution")
    trainer = make_trainer("gpg", tmp_path, toy_reward, data=data)
    with pytest.raises(TypeError, match="solution") as info:
        trainer.train()
    assert "toy_reward" in " ".join(info.value.__notes__)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_missing_prompt_column_fails_fast(tmp_path, name):
    data = build_toy_dataset(num_rows=32).rename_column("prompt", "question")
    with pytest.raises((KeyError, ValueError), match="prompt"):
        make_trainer(name, tmp_path, lambda completions, **kw: [0.0] * len(completions), data=data).train()


# ----------------------------------------------------------------------------- config validation
CONFIGS = {"gpg": GPGConfig, "guidance": GuidanceGCPOConfig}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unknown_field_fails_with_its_name(tmp_path, name):
    with pytest.raises(TypeError, match="valid_treshold"):
        CONFIGS[name](**tiny_trainer_kwargs(tmp_path, valid_treshold=0.5))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unknown_yaml_key_fails_in_trlparser_with_its_name(tmp_path, name):
    from trl import TrlParser

    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path}
        use_cpu: true
        bf16: false
        rank_z: 0.3
    """))
    with pytest.raises(ValueError, match="rank_z"):
        TrlParser((CONFIGS[name],)).parse_args_and_config(["--config", str(path)])


@pytest.mark.parametrize(
    "name,overrides,field_name",
    [
        ("gpg", {"loss_type": "grpo"}, "loss_type"),  # GPG aggregates with loss_agg_mode
        ("gpg", {"scale_rewards": "none"}, "scale_rewards"),  # GPG normalises with advantage_norm
        ("gpg", {"epsilon_high": 0.28}, "epsilon_high"),  # no ratio, nothing to clip
        ("gpg", {"entropy_coef": 0.01}, "entropy_coef"),
        ("gpg", {"gpg_preset": "open_rs_1p5b", "valid_threshold": 0.5}, "valid_threshold"),
        ("gpg", {"beta": 0.04}, "beta"),
        ("guidance", {"loss_type": "grpo"}, "loss_type"),
        ("guidance", {"beta": 0.04}, "beta"),
        ("guidance", {"rank_x": 0.6, "rank_y": 0.5}, "rank_y"),
        ("guidance", {"negative_template": "{prompt}?"}, "negative_template"),  # needs negative_prompt_type=custom
    ],
)
def test_contradictory_or_ineffective_fields_fail_fast_with_the_field_name(tmp_path, name, overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        CONFIGS[name](**tiny_trainer_kwargs(tmp_path, **overrides))


def test_gpg_defaults_and_a_normal_yaml_still_parse(tmp_path):
    cfg = GPGConfig(**tiny_trainer_kwargs(tmp_path, scale_rewards=True))  # TRL's boolean spelling of "group"
    assert cfg.scale_rewards == "group" and cfg.loss_type == "dapo"
