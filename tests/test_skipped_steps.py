"""Skipped optimizer steps are reported (grouprl_trl.base.SkippedStepReport): a warning at the first
skipped step and after every ``skip_warning_every`` skips in a row, with the trainer's reason, and a
count when training ends. The expected warnings are derived in the test from the skip pattern."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import tiny_trainer_kwargs

from grouprl_trl import GPGConfig, GPGTrainer, GuidanceGCPOConfig, GuidanceGCPOTrainer
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

LOGGER = "grouprl_trl.base"


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def expected_warnings(pattern: list[bool], every: int) -> list[tuple[str, int, int]]:
    """Naive re-derivation: ("first", step, 1) at the first skip, ("run", step, run) whenever the run of
    consecutive skips reaches a multiple of ``every`` (not on the first skip), then ("summary", skipped, steps)."""
    out, skipped, run = [], 0, 0
    for step, skip in enumerate(pattern, start=1):
        if not skip:
            run = 0
            continue
        skipped, run = skipped + 1, run + 1
        if skipped == 1:
            out.append(("first", step, 1))
        elif run % every == 0:
            out.append(("run", step, run))
    if skipped:
        out.append(("summary", skipped, len(pattern)))
    return out


def parse(messages: list[str], name: str) -> list[tuple[str, int, int]]:
    found = []
    for m in messages:
        if match := re.match(rf"{re.escape(name)} skipped optimizer step (\d+): ", m):
            found.append(("first", int(match.group(1)), 1))
        elif match := re.match(rf"{re.escape(name)} skipped (\d+) optimizer steps in a row \(steps (\d+)-(\d+);", m):
            run, first, last = map(int, match.groups())
            assert last - first + 1 == run
            found.append(("run", last, run))
        elif match := re.match(rf"{re.escape(name)} skipped (\d+) of (\d+) optimizer steps \(", m):
            found.append(("summary", int(match.group(1)), int(match.group(2))))
    return found


SKIP_PATTERN = [True, True, False, True, True, True, True, False]  # which optimizer steps see all-zero rewards


def test_guidance_warns_at_the_first_skip_then_every_n_in_a_row_and_counts_at_the_end(tmp_path, caplog):
    calls = []

    def scheduled_reward(completions, **kwargs):
        """All-zero rewards (every group dropped by the filter) on the steps SKIP_PATTERN marks, else 0,1,0,1."""
        skip = SKIP_PATTERN[len(calls)]
        calls.append(skip)
        return [0.0 if skip else float(i % 2) for i in range(len(completions))]

    tok = build_tokenizer()
    args = GuidanceGCPOConfig(**tiny_trainer_kwargs(tmp_path, max_steps=len(SKIP_PATTERN)))
    trainer = GuidanceGCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=scheduled_reward, args=args,
                                  train_dataset=build_toy_dataset(num_rows=64), processing_class=tok)
    trainer.skip_warning_every = 2
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer.train()
    assert calls == SKIP_PATTERN  # one generation per optimizer step
    skipped = [h["guidance/skipped_step"] for h in trainer.state.log_history if "guidance/skipped_step" in h]
    assert skipped == [float(s) for s in SKIP_PATTERN]
    messages = _messages(caplog)
    # steps 1 (first), 2 (2 in a row), 5 (2 in a row), 7 (4 in a row); 6 of 8 skipped
    assert parse(messages, "GCPO-guidance") == expected_warnings(SKIP_PATTERN, 2)
    assert len(messages) == len(expected_warnings(SKIP_PATTERN, 2))
    # each warning names the reason and the fields to change
    assert all("dynamic filter dropped every group" in m and "dynamic_filter=False" in m and "accuracy_reward" in m
               for m in messages)
    assert (trainer.skipped_steps.skipped, trainer.skipped_steps.steps) == (6, 8)


@pytest.mark.parametrize("grad_accum, valid_threshold", [(1, 0.0), (2, 0.0), (1, 0.6)])
def test_gpg_zero_variance_steps_are_reported_the_same_way(tmp_path, caplog, grad_accum, valid_threshold):
    calls = []

    def constant_reward(completions, **kwargs):
        calls.append(len(completions))
        return [0.0] * len(completions)

    tok = build_tokenizer()
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, max_steps=3, valid_threshold=valid_threshold,
                                           max_resample_rounds=2, gradient_accumulation_steps=grad_accum))
    trainer = GPGTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=constant_reward, args=args,
                         train_dataset=build_toy_dataset(num_rows=64), processing_class=tok)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer.train()
    pattern = [True] * 3
    messages = _messages(caplog)
    assert parse(messages, "GPG") == expected_warnings(pattern, trainer.skip_warning_every)
    assert (trainer.skipped_steps.skipped, trainer.skipped_steps.steps) == (3, 3)
    # one generation per step without the threshold; 1 + max_resample_rounds rounds with it
    assert len(calls) == 3 * (1 if valid_threshold == 0 else 3)
    # the warnings say why in GPG's terms and name the fields that help
    assert messages and all("no group in the batch has non-equal rewards" in m and "num_generations (now 4)" in m
                            for m in messages)
    if valid_threshold == 0:
        assert all("set valid_threshold > 0" in m for m in messages)
    else:
        assert all("all 3 generation rounds" in m and "raise max_resample_rounds" in m for m in messages)


def test_a_run_without_skips_says_nothing_above_info(tmp_path, caplog):
    def alternating(completions, **kwargs):
        return [float(i % 2) for i in range(len(completions))]

    tok = build_tokenizer()
    args = GuidanceGCPOConfig(**tiny_trainer_kwargs(tmp_path, max_steps=2))
    trainer = GuidanceGCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=alternating, args=args,
                                  train_dataset=build_toy_dataset(num_rows=32), processing_class=tok)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        trainer.train()
    assert _messages(caplog) == []
    infos = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert infos == ["GCPO-guidance skipped 0 of 2 optimizer steps."]
