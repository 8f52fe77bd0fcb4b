"""``grouprl train tiny_cpu_gpg ... resume_from_checkpoint=...`` continues a run: an interrupted run
resumed from its checkpoint ends exactly where the straight run ends.

The straight run (3 steps, a checkpoint after every step) is the reference; its ``checkpoint-1`` is
the state an interruption after step 1 leaves behind. A fresh output folder holding only that
checkpoint is resumed with ``resume_from_checkpoint=last`` (one process) or the checkpoint's path
(two gloo processes, launched by the CLI through torchrun). The reward (tests/resume_rewards.py) and
seed 2 leave GPG's carry buffer non-empty at step 1 (checked), so step 2 of the resumed run matches
the straight one only if the buffer was restored; the step count, the logged metrics, the GPG state
of every later checkpoint and the final weights must all match.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = ["tiny_cpu_gpg", "max_steps=3", "save_strategy=steps", "save_steps=1", "seed=2",
       "reward_funcs=[resume_rewards.low_digit_reward]"]


def _grouprl_train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "grouprl.cli", "train", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _gpg_state(checkpoint: Path, rank: int) -> dict:
    return torch.load(checkpoint / f"gpg_state_rank{rank}.pt", weights_only=True)


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


def _logged(run: subprocess.CompletedProcess) -> list[dict]:
    """The metrics dicts the trainer printed (one per optimizer step), without the wall-clock step_time."""
    import ast

    logs = [ast.literal_eval(line[line.index("{'loss'"):].split("}")[0] + "}")
            for line in (run.stdout + run.stderr).replace("\r", "\n").splitlines() if "{'loss'" in line]
    return [{k: v for k, v in log.items() if k != "step_time"} for log in logs]


@pytest.mark.parametrize("processes", [1, 2])
def test_cli_resume_continues_the_interrupted_run(tmp_path, processes):
    straight = tmp_path / "straight"
    ref = _grouprl_train(tmp_path, *RUN, f"num_processes={processes}", f"output_dir={straight}")
    carry = _gpg_state(straight / "checkpoint-1", 0)["carry"]
    assert carry is not None and carry["completion_ids"].shape[0] > 0, "the test needs a carried group at step 1"

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    where = "last" if processes == 1 else str(resumed / "checkpoint-1")
    run = _grouprl_train(tmp_path, *RUN, f"num_processes={processes}", f"output_dir={resumed}",
                         f"resume_from_checkpoint={where}")
    out = run.stdout + run.stderr
    assert f"resuming from {resumed / 'checkpoint-1'} (step 1)" in out  # our summary line
    if processes == 2:
        assert "torch.distributed.run" in out and "--nproc_per_node 2" in out

    # the step count continues: the resumed process trained steps 2 and 3 only, and wrote no checkpoint-1
    assert _state(resumed / "checkpoint-3")["global_step"] == 3
    assert len(_logged(run)) == 2 and len(_logged(ref)) == 3
    assert _logged(run) == _logged(ref)[1:]  # every printed metric of steps 2 and 3, as the straight run
    for key in ("loss", "gpg/carried_frac", "reward", "gpg/alpha"):
        assert [h[key] for h in _state(resumed / "checkpoint-3")["log_history"] if key in h] == \
               [h[key] for h in _state(straight / "checkpoint-3")["log_history"] if key in h], key
    assert _logged(ref)[1]["gpg/carried_frac"] != "0"  # step 2 used the carried groups
    # the GPG state (carry buffer, resampling position) of every later checkpoint, on every process
    for step in (2, 3):
        for rank in range(processes):
            _assert_same(_gpg_state(resumed / f"checkpoint-{step}", rank),
                         _gpg_state(straight / f"checkpoint-{step}", rank))
    from safetensors.torch import load_file

    final, reference = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    _assert_same(final, reference)
    assert not torch.equal(load_file(straight / "checkpoint-1" / "model.safetensors")["model.embed_tokens.weight"],
                           reference["model.embed_tokens.weight"])  # steps 2-3 moved the weights


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    from grouprl.train_trl import resolve_resume

    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-9"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no checkpoint-N folder"):
        resolve_resume("last", str(tmp_path))
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path))
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    assert resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")  # 10 > 2: numeric order
    assert resolve_resume(None, str(tmp_path)) is None


def test_cli_refuses_a_missing_checkpoint_before_starting(tmp_path, capsys, monkeypatch):
    from grouprl import cli, preflight

    monkeypatch.chdir(tmp_path)
    spawned = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: spawned.append(a) or 0)
    monkeypatch.setattr(preflight, "detect_machine", lambda: preflight.Machine(()))
    assert cli.main(["train", "tiny_cpu_gpg", "resume_from_checkpoint=outputs/nope/checkpoint-2"]) == 1
    assert cli.main(["train", "tiny_cpu_gpg", "resume_from_checkpoint=last"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  resume    resume_from_checkpoint=outputs/nope/checkpoint-2: no such folder" in out
    assert "FAIL  resume    resume_from_checkpoint=last: output_dir outputs/tiny_cpu_gpg holds no checkpoint-N" in out
    assert spawned == []


def test_cpu_resume_compat_maps_only_indexed_cpu_devices(tmp_path):
    """torch 2.13 refuses map_location 'cpu:0'; inside the compat block it loads (as 'cpu')."""
    from grouprl.train_trl import cpu_resume_compat

    path = tmp_path / "t.pt"
    torch.save({"x": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="cpu:0"):
        torch.load(path, map_location=torch.device("cpu", 0), weights_only=True)
    with cpu_resume_compat(torch.device("cpu", 0)):
        assert torch.equal(torch.load(path, map_location=torch.device("cpu", 0), weights_only=True)["x"],
                           torch.arange(3))
    original = torch.load
    with cpu_resume_compat(torch.device("cpu")):  # a plain CPU device needs nothing: torch.load untouched
        assert torch.load is original
    assert torch.load is original
