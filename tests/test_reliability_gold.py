"""GCPO-gold reliability: empty and over-long reference solutions, a missing reference column.

Written against the GCPOTrainer / GCPOConfig API (fields ``reference_column``, ``gold_template``;
metrics ``gold/injected_frac``, ``gold/reward_mean``, docs/metrics.md). The reward only pays for a
completion starting with "777", which a fresh model (42-token vocabulary, 3 tokens) practically
never samples, so every group is all-wrong and asks for gold.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_trainer_kwargs

from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

LONG_REFERENCE = "7" * 40  # far longer than max_completion_length=3


def triple_seven_reward(completions, **kwargs):
    return [float(c.startswith("777")) for c in completions]


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _trainer(tmp_path, solutions, **overrides):
    from grouprl_trl.gcpo import GCPOConfig, GCPOTrainer

    data = build_toy_dataset(num_rows=32).remove_columns("solution")
    data = data.add_column("reference", [solutions[i % len(solutions)] for i in range(len(data))])
    tok = build_tokenizer()
    fields = {"max_steps": 2, "reference_column": "reference", "gold_template": "{solution}", **overrides}
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, **fields))
    return GCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=triple_seven_reward, args=args,
                       train_dataset=data, processing_class=tok)


def _assert_finite(trainer):
    for n, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_over_long_reference_is_cut_to_the_completion_length_and_still_scored(tmp_path):
    trainer = _trainer(tmp_path, [LONG_REFERENCE])
    trainer.train()
    assert _logged(trainer, "gold/injected_frac") == [1.0, 1.0]  # every group all-wrong, every row has gold
    # the gold completion is the first 3 tokens "777" (cut like a sampled completion) and earns the reward
    assert _logged(trainer, "gold/reward_mean") == [1.0, 1.0]
    _assert_finite(trainer)


def test_empty_reference_means_no_gold_and_no_nan(tmp_path):
    trainer = _trainer(tmp_path, [""])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert _logged(trainer, "gold/injected_frac") == [0.0, 0.0]
    _assert_finite(trainer)
    # all groups all-wrong and no gold: every advantage is 0, so nothing moves (no weight decay here)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(before[n], p.detach()), n


def test_mixed_empty_and_over_long_references_train_with_finite_weights(tmp_path):
    trainer = _trainer(tmp_path, ["", LONG_REFERENCE], max_steps=3)
    trainer.train()
    fractions = _logged(trainer, "gold/injected_frac")
    assert len(fractions) == 3 and all(0.0 <= f <= 1.0 for f in fractions)
    _assert_finite(trainer)


def test_missing_reference_column_fails_at_start_naming_the_field(tmp_path):
    from grouprl_trl.gcpo import GCPOConfig, GCPOTrainer

    tok = build_tokenizer()
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, reference_column="reference", gold_template="{solution}"))
    with pytest.raises(ValueError, match="reference_column"):
        GCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=triple_seven_reward, args=args,
                    train_dataset=build_toy_dataset(num_rows=16), processing_class=tok)


# ----------------------------------------------------------------------------- faults and gold that scores 0
@pytest.mark.parametrize("placement", ["replace", "append"])
@pytest.mark.parametrize("bad", [None, float("nan")], ids=["none", "nan"])
def test_a_gold_row_without_a_finite_reward_is_an_error_naming_the_function(tmp_path, placement, bad):
    """Sampled rows score 0 (every group all-wrong); the gold completion gets None / NaN: refused like any
    other row (the rule every grouprl trainer shares), before any update."""
    def gold_unscored(completions, solution, **kwargs):
        return [bad if c == s else 0.0 for c, s in zip(completions, solution, strict=True)]

    from grouprl_trl.gcpo import GCPOConfig, GCPOTrainer

    tok = build_tokenizer()
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, gold_template="{solution}", gold_placement=placement))
    trainer = GCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=gold_unscored, args=args,
                          train_dataset=build_toy_dataset(num_rows=32), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"reward_funcs \['gold_unscored'\] returned NaN/None/inf"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def ends_with_boxed_answer(completions, solution, **kwargs):
    """1.0 when the (decoded) completion ends with "boxed<answer>": the tiny tokenizer has no "<", "\\\\", "{",
    so the default gold template decodes to "think<answer>thinkboxed<answer>"; a cut one loses its end."""
    return [float(c.endswith("boxed" + s)) for c, s in zip(completions, solution, strict=True)]


def _expected_gold_reward(tok, solution: str, max_len: int) -> float:
    """The default template's gold for ``solution``, cut as a sampled completion would be, then scored."""
    from grouprl_core.gold import DEFAULT_GOLD_TEMPLATE

    ids = tok(DEFAULT_GOLD_TEMPLATE.format(solution=solution), add_special_tokens=False)["input_ids"]
    kept = ids if len(ids) + 1 <= max_len else ids[:max_len]
    return ends_with_boxed_answer([tok.decode(kept, skip_special_tokens=True)], [solution])[0]


@pytest.mark.parametrize("max_len", [35, 60])
def test_gold_below_the_threshold_warns_once_and_is_counted(tmp_path, caplog, max_len):
    """Default gold template, references "7" and "7777777777": at 35 tokens the long one is cut before its
    answer and scores 0; at 60 both fit. gold/below_threshold_frac per step equals the share of injected
    groups whose gold (rendered, cut and scored here by hand) stays below correct_threshold=1."""
    import logging

    from datasets import Dataset

    from grouprl_trl.gcpo import GCPOConfig, GCPOTrainer

    tok = build_tokenizer()
    rows = [{"prompt": f"q{i % 10}:", "solution": "7" if i % 2 else "7777777777"} for i in range(48)]
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, max_steps=4, max_completion_length=max_len))
    trainer = GCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=ends_with_boxed_answer, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    batches = []
    generate = trainer._generate_and_score_completions

    def keep_inputs(inputs):
        batches.append([x["solution"] for x in inputs[:: trainer.num_generations]])
        return generate(inputs)

    trainer._generate_and_score_completions = keep_inputs
    with caplog.at_level(logging.WARNING, logger="grouprl_trl.gcpo"):
        trainer.train()
    assert _logged(trainer, "gold/injected_frac") == [1.0] * 4  # the model never ends in "boxed7"
    expected = [sum(_expected_gold_reward(tok, s, max_len) < 1.0 for s in group) / len(group) for group in batches]
    assert _logged(trainer, "gold/below_threshold_frac") == pytest.approx(expected)
    warnings = [r.getMessage() for r in caplog.records if "below correct_threshold" in r.getMessage()]
    if any(expected):
        assert len(warnings) == 1  # once, although several steps had gold below the threshold
        assert "max_completion_length" in warnings[0] and "gold_template" in warnings[0]
        assert "gold/below_threshold_frac" in warnings[0]
    else:
        assert warnings == []
    if max_len == 35:
        assert sum(e > 0 for e in expected) >= 2  # the case the warning is about happened more than once
