"""bench/gpu_step.py keeps working: its --tiny CPU mode trains TRL's GRPO and grouprl's GPG for real
(TRL's train() loop, one warm-up and one timed step) and writes the JSON and markdown table that the
GPU run produces. No timing is asserted, only that every number was measured."""

import json
import math

from bench import gpu_step


def test_tiny_cpu_run_writes_rows_with_measured_numbers(tmp_path):
    gpu_step.main(["--tiny", "--algos", "grpo,gpg", "--out", str(tmp_path)])

    payload = json.loads((tmp_path / "gpu_step_tiny_cpu.json").read_text())
    rows = {r["algo"]: r for r in payload["results"]}
    assert set(rows) == {"grpo", "gpg"}
    for algo, row in rows.items():
        assert row["status"] == "ok", row
        assert row["size"] == "tiny"
        # first row of the shape: 1 warm-up + 1 timed step; the next row: 0 + 1
        assert len(row["step_times_s"]) == row["warmup_steps"] + row["timed_steps"]
        assert row["timed_steps"] == 1
        for key in ("step_s", "generation_step_s", "peak_memory_gib"):
            assert math.isfinite(row[key]) and row[key] > 0, (algo, key, row[key])
        assert row["generation_step_s"] < row["step_s"]
        # 8 completions per step (one prompt x G = 8), counted at TRL's generation call
        assert row["completions_per_step"] == 8
    assert rows["grpo"]["warmup_steps"] == 1 and rows["gpg"]["warmup_steps"] == 0
    # the GPG row ran grouprl's trainer: its log carries GPG's own metrics
    assert "gpg/alpha" in rows["gpg"]["last_log"] and "gpg/alpha" not in rows["grpo"]["last_log"]
    assert rows["grpo"]["step_vs_grpo"] == 1.0
    assert rows["gpg"]["step_vs_grpo"] == rows["gpg"]["step_s"] / rows["grpo"]["step_s"]

    table = (tmp_path / "gpu_step_tiny_cpu.md").read_text()
    assert "| tiny | GRPO (TRL, beta 0) | 1 |" in table and "| tiny | GPG | 1 |" in table
