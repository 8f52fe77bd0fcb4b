"""GuidanceGCPOTrainer end to end on the tiny model: runs and metrics, credit maps, the dynamic
filter on hand-made batches, a real skipped step, LoRA (with gradient checkpointing), config
errors and YAML parsing through ``trl.TrlParser``."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from grouprl_trl.guidance import GuidanceGCPOConfig, GuidanceGCPOTrainer
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset


def alternating_reward(completions, **kwargs):
    """0, 1, 0, 1, ...: every group (of even size) has mean 0.5, so the filter keeps it."""
    return [float(i % 2) for i in range(len(completions))]


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def _config(tmp_path, **overrides):
    cfg = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=4, learning_rate=1e-2,
        max_steps=3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
    )
    cfg.update(overrides)
    return GuidanceGCPOConfig(**cfg)


def _trainer(tmp_path, reward=alternating_reward, peft_config=None, **overrides):
    tok = build_tokenizer()
    return GuidanceGCPOTrainer(
        model=build_tiny_model(tok, seed=0), reward_funcs=reward, args=_config(tmp_path, **overrides),
        train_dataset=build_toy_dataset(num_rows=32, seed=0), processing_class=tok, peft_config=peft_config,
    )


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("weights_from", ["current", "old_policy"])
def test_trains_logs_metrics_and_writes_credit_maps(tmp_path, weights_from):
    trainer = _trainer(tmp_path, weights_from=weights_from, credit_map_every=2, entropy_penalty_coef=0.02)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 3
    weight_max = _logged(trainer, "guidance/weight_max")
    divergence = _logged(trainer, "guidance/divergence_mean")
    kept = _logged(trainer, "guidance/kept_frac")
    assert len(weight_max) == len(divergence) == len(kept) == 3
    # weights have mean 1 over at most 4 tokens, so the largest lies in [1, 4]
    assert all(1.0 <= w <= 4.0 for w in weight_max)
    assert all(0.0 <= d <= 10.0 and math.isfinite(d) for d in divergence)
    assert kept == [1.0, 1.0, 1.0]  # alternating rewards: no group is all-wrong or all-right
    assert _logged(trainer, "guidance/skipped_step") == [0.0, 0.0, 0.0]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    # steps as the logs number them (1, 2, 3): with credit_map_every=2 only step 2 gets a page
    maps = sorted(p.name for p in (tmp_path / "credit_maps").iterdir())
    assert maps == ["step_000002.html"]
    page = (tmp_path / "credit_maps" / "step_000002.html").read_text()
    assert "step 2" in page and page.count("<span class='t'") >= 4 and "w = " in page


def test_credit_map_of_the_logged_step_shows_whole_groups(tmp_path):
    """credit_map_every=3: after 3 steps the page of step 3 exists (the step number the logs show), holds the
    whole generation batch (2 micro-batches, shuffled and split by TRL) and shows groups whose completions
    are right and wrong: alternating rewards put 2 correct and 2 wrong completions in every group of 4, which
    the page only shows if rewards and group ids followed their rows through the shuffle."""
    import re

    trainer = _trainer(tmp_path, credit_map_every=3, max_steps=3, gradient_accumulation_steps=2)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
    maps = sorted(p.name for p in (tmp_path / "credit_maps").iterdir())
    assert maps == ["step_000003.html"]
    page = (tmp_path / "credit_maps" / "step_000003.html").read_text()
    assert "step 3</title>" in page and "&middot; step 3</h1>" in page
    rows = 8 * 2  # per_device_train_batch_size x steps_per_generation (= gradient_accumulation_steps)
    assert f"Step 3: {rows} completions in {rows // 4} groups" in page
    shown = re.findall(r"<b>rewards</b> ([0-9. /]+?)(?: &nbsp;|</p>)", page)
    assert len(shown) == 3 and all(r == "1 / 1 / 0 / 0" for r in shown)  # 3 groups shown, each right and wrong
    assert page.count("A = +") >= 6 and page.count("A = -") >= 6


def test_the_docs_picture_comes_from_a_training_run(tmp_path):
    """``python -m grouprl_trl.credit_map --train DIR`` (docs/credit_map.png) trains and writes the page of its
    last step."""
    from grouprl_trl.credit_map import main

    assert main(["--train", str(tmp_path), "--step", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "credit_maps").iterdir()) == ["step_000002.html"]
    assert "&middot; step 2</h1>" in (tmp_path / "credit_maps" / "step_000002.html").read_text()


def test_all_groups_filtered_skips_the_optimizer_step(tmp_path):
    # all rewards 0 -> every group is dropped -> no update, even with weight decay and an entropy penalty
    trainer = _trainer(tmp_path, reward=zero_reward, max_steps=2, weight_decay=0.1, entropy_penalty_coef=0.5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(before[n], p), n
    assert _logged(trainer, "guidance/skipped_step") == [1.0, 1.0]
    assert _logged(trainer, "guidance/kept_frac") == [0.0, 0.0]


def test_without_the_filter_the_same_run_updates(tmp_path):
    trainer = _trainer(tmp_path, reward=zero_reward, max_steps=1, dynamic_filter=False, entropy_penalty_coef=0.5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert _logged(trainer, "guidance/kept_frac") == []


def test_lora_with_gradient_checkpointing(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tmp_path, peft_config=lora, max_steps=2, gradient_checkpointing=True)
    named = dict(trainer.model.named_parameters())
    lora_b = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    frozen = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    assert lora_b and frozen and all(float(p.abs().sum()) == 0.0 for p in lora_b.values())
    trainer.train()
    named = dict(trainer.model.named_parameters())
    assert all(float(named[n].detach().abs().sum()) > 0.0 for n in lora_b)
    assert all(torch.equal(frozen[n], named[n]) for n in frozen)
    assert len(_logged(trainer, "guidance/weight_max")) == 2


# ----------------------------------------------------------------------------- dynamic filter
def _hand_batch(num_rows: int, width: int = 2) -> dict:
    marker = torch.arange(num_rows).unsqueeze(1).repeat(1, width) + 4  # row i has tokens i+4
    return {
        "prompt_ids": torch.full((num_rows, 3), 5), "prompt_mask": torch.ones(num_rows, 3, dtype=torch.long),
        "neg_prompt_ids": torch.full((num_rows, 7), 6), "neg_prompt_mask": torch.ones(num_rows, 7, dtype=torch.long),
        "completion_ids": marker, "completion_mask": torch.ones(num_rows, width, dtype=torch.long),
        "advantages": torch.arange(1, num_rows + 1, dtype=torch.float32) / 10,
        "num_items_in_batch": torch.tensor(float(num_rows * width)),
    }


@pytest.fixture(scope="module")
def filter_trainer(tmp_path_factory):
    # groups of 3, per_device 3 x steps_per_generation 2 = 6 rows = 2 groups per generation batch
    return _trainer(
        tmp_path_factory.mktemp("filter"), per_device_train_batch_size=3, num_generations=3,
        gradient_accumulation_steps=2,
    )


@pytest.mark.parametrize(
    "accuracy, kept_rows, filler_rows",
    [
        ([0, 1, 0, 1, 1, 1], [0, 1, 2], [3]),  # group 0 mixed, group 1 all right
        ([0.005, 0.01, 0.0, 0.2, 0.99, 0.5], [3, 4, 5], [0]),  # group 0 mean 0.005 <= 0.01
        ([0.99, 0.99, 0.99, 0.01, 0.01, 0.01], [], [0, 1]),  # both exactly on the bounds: dropped
        ([1, 0, 0, 0, 1, 1], [0, 1, 2, 3, 4, 5], []),
    ],
)
def test_dynamic_filter_on_hand_made_batch(filter_trainer, accuracy, kept_rows, filler_rows):
    trainer = filter_trainer
    assert trainer.args.steps_per_generation == 2
    trainer._metrics["train"].clear()
    out = trainer._dynamic_filter(_hand_batch(6), torch.tensor(accuracy, dtype=torch.float32))
    rows = kept_rows + filler_rows
    assert (out["completion_ids"][:, 0] - 4).tolist() == rows
    assert len(rows) % 2 == 0  # a multiple of steps_per_generation, so every micro-batch gets rows
    n_kept = len(kept_rows)
    assert out["completion_mask"][:n_kept].sum() == 2 * n_kept and out["completion_mask"][n_kept:].sum() == 0
    assert out["advantages"].tolist() == pytest.approx([(r + 1) / 10 for r in kept_rows] + [0.0] * len(filler_rows))
    assert out["neg_prompt_ids"].shape == (len(rows), 7)
    assert float(out["num_items_in_batch"]) == 2 * n_kept
    assert bool(out["guidance_skip"]) == (n_kept == 0)
    assert trainer._metrics["train"]["guidance/kept_frac"] == [n_kept / 6]


def test_skip_batch_returns_a_graphless_zero_loss(filter_trainer):
    out = filter_trainer._dynamic_filter(_hand_batch(6), torch.zeros(6))
    filter_trainer.model.train()
    loss = filter_trainer.compute_loss(filter_trainer.model, out)
    assert float(loss.detach()) == 0.0 and loss.grad_fn is None


def test_accuracy_source(tmp_path):
    """The filter reads one reward function's value: the named one, or the only one; several without a
    name, or a name that is not a reward function, are start-up errors."""
    def acc(completions, **kwargs):
        return [0.0] * len(completions)

    def fmt(completions, **kwargs):
        return [0.0] * len(completions)

    tok = build_tokenizer()
    kwargs = dict(model=build_tiny_model(tok), train_dataset=build_toy_dataset(8), processing_class=tok)
    named = GuidanceGCPOTrainer(args=_config(tmp_path, accuracy_reward="acc", reward_weights=[1.0, 0.5]),
                                reward_funcs=[acc, fmt], **kwargs)
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [float("nan"), 1.0], [1.0, 0.0]])
    named._last_rewards_per_func = rewards
    assert named._accuracy().tolist() == [1.0, 0.0, 0.0, 1.0]  # column "acc", unweighted; None counts as 0
    only = GuidanceGCPOTrainer(args=_config(tmp_path), reward_funcs=[fmt], **kwargs)
    only._last_rewards_per_func = rewards[:, 1:]
    assert only._accuracy().tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="accuracy_reward='nope'"):
        GuidanceGCPOTrainer(args=_config(tmp_path, accuracy_reward="nope"), reward_funcs=[acc, fmt], **kwargs)
    with pytest.raises(ValueError, match="accuracy_reward is not set and there are 2 reward functions"):
        GuidanceGCPOTrainer(args=_config(tmp_path), reward_funcs=[acc, fmt], **kwargs)
    GuidanceGCPOTrainer(args=_config(tmp_path, dynamic_filter=False), reward_funcs=[acc, fmt], **kwargs)  # no filter


def five_point_reward(completions, **kwargs):
    """A graded 0-5 score (e.g. a rubric): as "accuracy" every group mean would be >= 0.99 or 0."""
    return [5.0 * (i % 2) for i in range(len(completions))]


def reward_model_like(completions, **kwargs):
    """Unbounded float scores, as a reward model gives."""
    return [len(c) - 2.5 for c in completions]


@pytest.mark.parametrize("reward", [five_point_reward, reward_model_like])
def test_accuracy_outside_unit_interval_is_an_error_not_a_silent_skip(tmp_path, reward):
    trainer = _trainer(tmp_path, reward=reward, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"reads the only reward function '%s'.*outside \[0, 1\].*accuracy_reward.*"
                                         r"dynamic_filter=False" % reward.__name__):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    # the same reward with the filter off trains
    trainer = _trainer(tmp_path, reward=reward, max_steps=1, dynamic_filter=False)
    trainer.train()
    assert trainer.state.global_step == 1


def test_reward_model_as_accuracy_is_a_startup_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    reward_model = Qwen2ForSequenceClassification(config)
    kwargs = dict(model=build_tiny_model(tok), train_dataset=build_toy_dataset(8), processing_class=tok,
                  reward_processing_classes=[tok])
    with pytest.raises(ValueError, match="reward model .* as accuracy.*accuracy_reward.*dynamic_filter=False"):
        GuidanceGCPOTrainer(args=_config(tmp_path), reward_funcs=[reward_model], **kwargs)


def test_named_accuracy_reward_filters_as_a_naive_count(tmp_path):
    """A 0-5 score next to a 0/1 accuracy: the filter reads the accuracy; kept groups per step equal a
    count written out here from the accuracies the reward function returned."""
    seen = []

    def acc(completions, solution, **kwargs):
        values = [float(c[:1] == s) for c, s in zip(completions, solution, strict=True)]
        seen.append(values)
        return values

    def score(completions, **kwargs):
        return [5.0 * (len(c) % 2) + 0.5 for c in completions]

    tok = build_tokenizer()
    data = build_toy_dataset(num_rows=64, seed=3)
    # make the toy task easy enough that some groups are mixed: half the rows accept the digit "0".
    data = data.map(lambda row, i: {"solution": "0" if i % 2 else row["solution"]}, with_indices=True)
    args = _config(tmp_path, accuracy_reward="acc", reward_weights=[1.0, 0.2], max_steps=6, max_completion_length=2,
                   per_device_train_batch_size=16)
    trainer = GuidanceGCPOTrainer(model=build_tiny_model(tok, seed=1), reward_funcs=[acc, score], args=args,
                                  train_dataset=data, processing_class=tok)
    trainer.train()
    group = 4
    expected = []
    for values in seen:
        means = [sum(values[g:g + group]) / group for g in range(0, len(values), group)]
        expected.append(sum(0.01 < m < 0.99 for m in means) / len(means))
    assert _logged(trainer, "guidance/kept_frac") == pytest.approx(expected)
    assert _logged(trainer, "guidance/skipped_step") == [float(k == 0) for k in expected]
    assert any(k > 0 for k in expected)  # the run does learn from some groups


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, field_name",
    [
        ({"rank_x": 0.0}, "rank_x"),
        ({"rank_y": 1.0}, "rank_y"),
        ({"rank_x": 0.8, "rank_y": 0.4}, "rank_y"),
        ({"weights_from": "ref"}, "weights_from"),
        ({"negative_prompt_type": "opposite"}, "negative_prompt_type"),
        ({"negative_prompt_type": "custom"}, "negative_template"),
        ({"negative_prompt_type": "custom", "negative_template": "{question}"}, "negative_template"),
        ({"negative_template": "{prompt}!"}, "negative_template"),
        ({"credit_map_every": -1}, "credit_map_every"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"entropy_penalty_coef": float("nan")}, "entropy_penalty_coef"),
        ({"loss_type": "grpo"}, "loss_type"),
        ({"beta": 0.04}, "beta"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"entropy_coef": 0.01}, "entropy_coef"),
    ],
)
def test_bad_field_values_are_errors_naming_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        _config(tmp_path, **overrides)


def test_defaults_follow_the_official_recipe(tmp_path):
    cfg = _config(tmp_path)
    assert (cfg.epsilon, cfg.epsilon_high, cfg.dual_clip, cfg.loss_type, cfg.beta) == (0.2, 0.28, 3.0, "dapo", 0.0)
    assert (cfg.rank_x, cfg.rank_y, cfg.weights_from, cfg.dynamic_filter) == (0.4, 0.8, "current", True)
    assert (cfg.negative_prompt_type, cfg.entropy_penalty_coef, cfg.credit_map_every) == ("wrong_answer", 0.0, 0)


def test_yaml_through_trl_parser(tmp_path):
    from trl import TrlParser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\nrank_x: 0.3\nrank_y: 0.9\nweights_from: old_policy\n"
        "negative_prompt_type: custom\nnegative_template: 'Answer wrongly: {prompt}'\ndual_clip: 2.5\n"
        "dynamic_filter: false\naccuracy_reward: toy_reward\ncredit_map_every: 50\nentropy_penalty_coef: 0.02\n"
    )
    (cfg,) = TrlParser((GuidanceGCPOConfig,)).parse_args_and_config(["--config", str(recipe), "--rank_x", "0.35"])
    assert isinstance(cfg, GuidanceGCPOConfig)
    assert (cfg.rank_x, cfg.rank_y, cfg.weights_from, cfg.dual_clip) == (0.35, 0.9, "old_policy", 2.5)
    assert (cfg.negative_prompt_type, cfg.negative_template) == ("custom", "Answer wrongly: {prompt}")
    assert (cfg.dynamic_filter, cfg.accuracy_reward, cfg.credit_map_every, cfg.entropy_penalty_coef) == (
        False, "toy_reward", 50, 0.02,
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {tmp_path}\nweights_from: sometimes\n")
    with pytest.raises((ValueError, SystemExit)):
        TrlParser((GuidanceGCPOConfig,)).parse_args_and_config(["--config", str(bad)])
