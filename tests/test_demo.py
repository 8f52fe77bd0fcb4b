"""The CPU demo's plumbing on a few steps: table rows, curves, files (learning itself is shown by the full demo)."""

import json
import math

import pytest


def test_demo_writes_table_plot_and_results(tmp_path, capsys):
    from grouprl_trl.demo import main

    rows = main(["--algo", "grpo,gpg", "--steps", "4", "--window", "2", "--out", str(tmp_path)])
    assert [r["algo"] for r in rows] == ["grpo", "gpg"]
    payload = json.loads((tmp_path / "results.json").read_text())
    for row in rows:
        curve = payload["curves"][row["algo"]]
        assert len(curve) == 4  # one logged reward per optimizer step
        # the table's start/end are the means of the first/last `window` logged rewards
        assert row["reward_start"] == sum(curve[:2]) / 2
        assert row["reward_end"] == sum(curve[-2:]) / 2
        assert all(0.0 <= r <= 1.0 for r in curve)
        assert math.isfinite(row["steps_per_s"]) and row["steps_per_s"] > 0
    assert rows[0]["extra_rounds_per_step"] == 0.0  # TRL's GRPO never resamples
    assert (tmp_path / "reward_curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| GRPO (TRL) |" in out and "| GPG |" in out


def test_demo_rejects_unknown_algorithm(capsys):
    import pytest

    from grouprl_trl.demo import main

    with pytest.raises(SystemExit):
        main(["--algo", "ppo"])
    assert "unknown algorithm 'ppo'" in capsys.readouterr().err


def test_steps_to_reach_uses_the_trailing_mean():
    from grouprl_trl.demo import steps_to_reach

    # trailing 2-step means: 0.0, 0.25, 0.5 -> reached at step 3
    assert steps_to_reach([0.0, 0.5, 0.5, 1.0], 0.5, smooth=2) == 3
    # a single spike is not enough with a 3-step window: means 0, 0, 1/3, 1/3, 2/3
    assert steps_to_reach([0.0, 0.0, 1.0, 0.0, 1.0], 0.5, smooth=3) == 5
    # the first steps average over the steps seen so far: means 0, 1/2
    assert steps_to_reach([0.0, 1.0], 0.5, smooth=3) == 2
    assert steps_to_reach([0.1, 0.2], 0.5, smooth=2) is None


def test_demo_counts_every_generated_completion_including_gpg_rounds(tmp_path, monkeypatch):
    """The completions column counts what the model generated: GPG's resampling rounds included."""
    import grouprl_trl.tiny as tiny
    from grouprl_trl.demo import run_algorithm

    generated = []
    build = tiny.build_tiny_model

    def counting_model(*args, **kwargs):
        model = build(*args, **kwargs)
        generate = model.generate

        def counted(*a, **kw):
            out = generate(*a, **kw)
            sequences = out.sequences if hasattr(out, "sequences") else out
            generated.append(sequences.shape[0])  # one row per sampled completion
            return out

        model.generate = counted
        return model

    monkeypatch.setattr(tiny, "build_tiny_model", counting_model)
    scored = []  # every reward the toy reward handed out, in order (each generated completion is scored once)
    reward = tiny.toy_reward

    def recording_reward(*args, **kwargs):
        values = reward(*args, **kwargs)
        scored.extend(values)
        return values

    recording_reward.__name__ = "toy_reward"
    monkeypatch.setattr(tiny, "toy_reward", recording_reward)
    # at the start almost every group is all-wrong, so GPG's threshold (0.6) regenerates
    result = run_algorithm("gpg", 3, 0, tmp_path, 2e-3, show_progress=False)
    assert sum(result.extra_rounds) > 0  # the case this test is about: extra rounds happened
    assert len(result.completions) == 3
    assert sum(result.completions) == sum(generated)
    assert sum(result.completions) > 3 * 64  # more than one round of 8 prompts x 8 completions per step
    # the curve is the mean reward of everything the policy generated in the step (all rounds), not of
    # the trained batch GPG assembles from valid groups
    assert len(scored) == sum(result.completions)
    start = 0
    for count, logged in zip(result.completions, result.rewards):
        assert logged == pytest.approx(sum(scored[start:start + count]) / count, abs=1e-6)
        start += count


def test_demo_summary_costs_up_to_the_step_that_reaches_half():
    from grouprl_trl.demo import RunResult

    run = RunResult("gpg", rewards=[0.0, 0.4, 1.0, 1.0], seconds=3.0, steps=3, peak_rss_mb=None, extra_rounds=[],
                    completions=[128, 64, 192, 64], elapsed=[1.0, 1.5, 2.5, 3.0])
    row = run.summary(window=2)
    # trailing 10-step means: 0, 0.2, 0.467, 0.6 -> reward 0.5 reached at step 4
    assert row["steps_to_half"] == 4
    assert row["completions_to_half"] == 128 + 64 + 192 + 64
    assert row["seconds_to_half"] == 3.0
    never = RunResult("grpo", rewards=[0.0, 0.1], seconds=1.0, steps=1, peak_rss_mb=None, extra_rounds=[],
                      completions=[64, 64], elapsed=[0.5, 1.0]).summary(window=2)
    assert never["completions_to_half"] is None and never["seconds_to_half"] is None
