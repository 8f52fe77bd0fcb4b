"""GPGTrainer end to end on the tiny model (TRL 1.16, CPU)."""

import textwrap

import pytest
import torch
from conftest import tiny_trainer_kwargs

from grouprl_trl import GPGConfig, GPGTrainer


class RecordingReward:
    """Reward known in advance: prompts with an even digit get 0.0 for every completion (a
    zero-variance group), prompts with an odd digit get alternating 1, 0 (a valid group)."""

    __name__ = "recording_reward"

    def __init__(self):
        self.calls = []  # prompts of each call

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append(list(prompts))
        return [float(int(p[1]) % 2 == 1 and i % 2 == 0) for i, p in enumerate(prompts)]


def expected_alpha(prompts):
    valid = sum(1 for p in prompts if int(p[1]) % 2 == 1)
    return len(prompts) / valid if valid else 0.0


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_alpha_equals_b_over_b_minus_m_and_no_reference_model(tmp_path, tiny_parts):
    model, tok, data = tiny_parts
    reward = RecordingReward()
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, max_steps=4, valid_threshold=0.0))
    trainer = GPGTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    assert trainer.ref_model is None
    trainer.train()
    assert len(reward.calls) == 4  # one generation per step, no resampling
    assert logged(trainer, "gpg/alpha") == pytest.approx([expected_alpha(c) for c in reward.calls])
    assert all(v == 0.0 for v in logged(trainer, "gpg/resample_rounds"))


def test_advantages_of_a_generation_batch(tmp_path, tiny_parts):
    model, tok, data = tiny_parts
    reward = RecordingReward()
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, valid_threshold=0.0))
    trainer = GPGTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    rows = [data[i] for i in range(2) for _ in range(4)]  # 2 prompts x G=4, TRL's layout
    batch = trainer._generate_gpg_batch(rows)
    trainer._set_gpg_advantages(batch, mode="train")
    prompts = reward.calls[-1]
    alpha = expected_alpha(prompts)
    expected = []
    for g in range(2):
        r = [float(int(p[1]) % 2 == 1 and (g * 4 + j) % 2 == 0) for j, p in enumerate(prompts[g * 4 : g * 4 + 4])]
        mean = sum(r) / 4
        expected += [alpha * (x - mean) if max(r) > min(r) else 0.0 for x in r]
    assert batch["advantages"].tolist() == pytest.approx(expected)
    assert "ref_per_token_logps" not in batch


def test_threshold_regenerates_and_stops_at_bound_and_skips_for_real(tmp_path, tiny_parts):
    model, tok, data = tiny_parts
    calls = []

    def constant_reward(prompts, completions, **kwargs):  # every group zero-variance
        calls.append(len(prompts))
        return [1.0] * len(prompts)

    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, max_steps=2, valid_threshold=0.6, max_resample_rounds=3,
                                           weight_decay=0.1))
    trainer = GPGTrainer(model=model, reward_funcs=constant_reward, args=args, train_dataset=data,
                         processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert len(calls) == 2 * (1 + 3)  # per step: the first round plus 3 extra rounds, then the bound stops it
    assert logged(trainer, "gpg/resample_rounds") == [3.0, 3.0]
    assert logged(trainer, "gpg/skipped_step") == [1.0, 1.0]
    assert logged(trainer, "gpg/alpha") == []  # a skipped step has no step size to log (issue 12 item 7)
    for n, p in trainer.model.named_parameters():  # AdamW with weight decay would have moved them
        assert torch.equal(before[n], p.detach()), n


def test_threshold_keeps_valid_groups_and_carries_leftovers(tmp_path, tiny_parts):
    model, tok, data = tiny_parts
    state = {"call": 0}

    def reward(prompts, completions, **kwargs):
        # call 1: only the first group is valid; later calls: every group is valid
        state["call"] += 1
        n = len(prompts)
        if state["call"] == 1:
            return [float(i == 0) for i in range(n)]
        return [float(i % 2 == 0) for i in range(n)]

    # 16 rows = 4 groups of 4 per batch; beta_th 0.75 needs 3 valid groups
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, max_steps=2, per_device_train_batch_size=16,
                                           valid_threshold=0.75))
    trainer = GPGTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    # step 1: 1 valid group + one more round with 4 valid -> batch = 1 old + 3 new, 1 group carried over
    assert logged(trainer, "gpg/resample_rounds") == [1.0, 0.0]
    assert logged(trainer, "gpg/valid_fraction") == [1.0, 1.0]
    assert logged(trainer, "gpg/alpha") == [1.0, 1.0]
    # step 2 uses the carried group first: 1 of 4 groups
    assert logged(trainer, "gpg/carried_frac") == [0.0, 0.25]
    assert state["call"] == 3


def test_drop_in_swap_runs_and_learns_signal(tmp_path, tiny_parts):
    model, tok, data = tiny_parts
    from grouprl_trl.tiny import toy_reward

    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, max_steps=3))
    trainer = GPGTrainer(model=model, reward_funcs=[toy_reward], args=args, train_dataset=data,
                         processing_class=tok)
    trainer.train()
    assert len(logged(trainer, "gpg/valid_fraction")) == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("beta", 0.04, "beta"),
        ("num_generations", 1, "num_generations"),
        ("valid_threshold", 1.5, "valid_threshold"),
        ("valid_threshold", -0.1, "valid_threshold"),
        ("advantage_norm", "std", "advantage_norm"),
        ("gpg_preset", "nope", "gpg_preset"),
        ("loss_agg_mode", "mean", "loss_agg_mode"),
    ],
)
def test_bad_config_names_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        GPGConfig(**tiny_trainer_kwargs(tmp_path, **{field: value}))


def test_preset_open_rs_and_contradiction(tmp_path):
    cfg = GPGConfig(**tiny_trainer_kwargs(tmp_path, gpg_preset="open_rs_1p5b"))
    assert (cfg.advantage_norm, cfg.age, cfg.valid_threshold) == ("group", False, 0.0)
    with pytest.raises(ValueError, match="advantage_norm"):
        GPGConfig(**tiny_trainer_kwargs(tmp_path, gpg_preset="open_rs_1p5b", advantage_norm="batch"))


def test_nan_reward_is_a_clear_error(tmp_path, tiny_parts):
    model, tok, data = tiny_parts

    def broken_reward(prompts, completions, **kwargs):
        return [None] * len(prompts)

    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, valid_threshold=0.0))
    trainer = GPGTrainer(model=model, reward_funcs=broken_reward, args=args, train_dataset=data,
                         processing_class=tok)
    with pytest.raises(ValueError, match="broken_reward"):
        trainer.train()


def test_yaml_through_trlparser(tmp_path):
    from trl import ModelConfig, TrlParser

    path = tmp_path / "gpg.yaml"
    path.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path}
        model_name_or_path: tiny
        advantage_norm: batch
        valid_threshold: 0.5
        max_resample_rounds: 4
        num_generations: 4
        per_device_train_batch_size: 8
        use_cpu: true
        bf16: false
    """))
    parser = TrlParser((GPGConfig, ModelConfig))
    cfg, model_cfg = parser.parse_args_and_config(["--config", str(path), "--age", "false"])
    assert isinstance(cfg, GPGConfig)
    assert (cfg.advantage_norm, cfg.valid_threshold, cfg.max_resample_rounds, cfg.age) == ("batch", 0.5, 4, False)
    assert cfg.beta == 0.0 and model_cfg.model_name_or_path == "tiny"


def test_loads_a_local_checkpoint_by_path(tmp_path):
    from grouprl_trl.tiny import build_toy_dataset, save_tiny_model, toy_reward

    path = save_tiny_model(tmp_path / "tiny-model")
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path / "out", max_steps=1))
    trainer = GPGTrainer(model=str(path), reward_funcs=toy_reward, args=args,
                         train_dataset=build_toy_dataset(num_rows=16))
    trainer.train()
    assert trainer.state.global_step == 1
