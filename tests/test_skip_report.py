"""grouprl_core.skips.SkipReport: the skipped-step warning rule both backends use, on a hand-written run.

Expected messages are written out by hand from the rule (first skip; every 10th skip in a row; a step
that is not skipped ends the run; a count at the end)."""

from __future__ import annotations

import pytest

from grouprl_core.skips import SkipReport

REASON = "no signal"


def run(report: SkipReport, skipped_steps: set[int], last: int) -> dict[int, str]:
    out = {}
    for step in range(1, last + 1):
        message = report.step(step, step in skipped_steps)
        if message is not None:
            out[step] = message
    return out


def test_first_skip_then_every_tenth_in_a_row_reset_by_a_trained_step_and_summary():
    # step 1 trained; 2-21 skipped (20 in a row); 22 trained; 23-41 skipped (19 in a row); 42 trained
    skipped = set(range(2, 22)) | set(range(23, 42))
    report = SkipReport("GPG", REASON, note="A note.")
    said = run(report, skipped, 42)
    assert said == {
        2: "GPG skipped optimizer step 2: no signal. A note.",
        11: "GPG skipped 10 optimizer steps in a row (steps 2-11; 10 of 11 so far): no signal.",
        21: "GPG skipped 20 optimizer steps in a row (steps 2-21; 20 of 21 so far): no signal.",
        # step 22 ended the run: the next warning comes 10 skips after step 23, not at 30 skips in all
        32: "GPG skipped 10 optimizer steps in a row (steps 23-32; 30 of 32 so far): no signal.",
    }
    assert (report.skipped, report.steps, report.in_a_row) == (39, 42, 0)
    assert report.summary() == "GPG skipped 39 of 42 optimizer steps (no signal)."


def test_step_numbers_are_the_trainers_and_the_first_warning_has_no_note_unless_given():
    report = SkipReport("GCPO-guidance", REASON, every=2)
    said = {}
    for step, skip in zip(range(101, 106), [True, True, True, False, True], strict=True):  # a resumed run
        if (message := report.step(step, skip)) is not None:
            said[step] = message
    assert said == {
        101: "GCPO-guidance skipped optimizer step 101: no signal.",
        102: "GCPO-guidance skipped 2 optimizer steps in a row (steps 101-102; 2 of 2 so far): no signal.",
    }
    assert report.summary() == "GCPO-guidance skipped 4 of 5 optimizer steps (no signal)."


def test_a_run_without_skips_says_nothing_until_the_count():
    report = SkipReport("GPG", REASON)
    assert run(report, set(), 25) == {}
    assert report.summary() == "GPG skipped 0 of 25 optimizer steps."


def test_every_below_one_is_a_clear_error():
    with pytest.raises(ValueError, match="every must be >= 1"):
        SkipReport("GPG", REASON, every=0)
