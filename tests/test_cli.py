"""The ``grouprl`` launcher: list, train --dry-run on every recipe (with its preflight report),
overrides and overlays, data/eval dispatch, no heavy imports, help texts, a closed pipe, and one real
``grouprl train tiny_cpu_gpg`` run on CPU. The preflight's own checks: tests/test_preflight.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from grouprl import cli, preflight, recipes

REPO = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted(recipes.recipe_paths())


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@pytest.fixture(autouse=True)
def cpu_machine(monkeypatch):
    """The preflight's GPU probe (a child process importing torch) replaced by this machine's answer."""
    monkeypatch.setattr(preflight, "detect_machine", lambda: preflight.Machine(()))


def _dry_run(capsys, *args):
    """(resolved recipe, command, preflight report, exit code) of ``grouprl train ... --dry-run``."""
    code = cli.main(["train", *args, "--dry-run"])
    out = capsys.readouterr().out
    config_text, _, rest = out.partition("# command\n")
    command, _, report = rest.partition("# preflight\n")
    return yaml.safe_load(config_text), shlex.split(command.strip()), report, code


# ----------------------------------------------------------------------------- list
def test_list_prints_every_recipe_with_backend_and_description(capsys):
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(ALL_RECIPES)
    listed = {line.split()[0]: line for line in lines}
    assert set(listed) == set(ALL_RECIPES)
    assert not any(name.startswith("_") for name in listed)  # bases are not recipes
    assert "[trl]" in listed["gpg_rs1_1p5b"] and "GPG-RS1" in listed["gpg_rs1_1p5b"]
    assert "[verl]" in listed["gpg_zero_math7b_verl"]
    for name, line in listed.items():
        description = line.split("]", 1)[1].strip()
        assert description, f"{name} has no description"


def test_cli_imports_no_torch_or_trl():
    code = ("import sys, grouprl.cli as c; c.main(['list']); "
            "heavy = [m for m in ('torch', 'trl', 'transformers', 'verl') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(), capture_output=True)


# ----------------------------------------------------------------------------- train --dry-run
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_dry_run_prints_resolved_recipe_command_and_preflight(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    printed, command, report, code = _dry_run(capsys, name)
    assert printed == recipes.resolve(name)
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing
    assert "base" not in printed
    # the preflight report: one line per check, the exit code follows its verdict
    topics = {line.split()[1] for line in report.splitlines()[1:-1]}
    assert {"extras", "config", "data", "model", "hardware"} <= topics, report
    assert code == (1 if "  FAIL  " in report else 0)
    assert not any("FAIL  config" in line for line in report.splitlines()), report  # every bundled recipe is valid
    if name.startswith("tiny_"):
        assert code == 0 and report.strip().endswith("all checks passed"), report
    else:  # this machine has no GPU: the gap is a report line, not a crash
        assert "FAIL  hardware  needs 8 GPUs with >= 80 GB each; this machine has no GPU (CPU only)" in report
    if printed["backend"] == "trl":
        tail = ["-m", "grouprl.train_trl", "--config", str(Path(printed["output_dir"]) / "grouprl_recipe.yaml")]
        assert command[-len(tail):] == tail
        if printed.get("num_processes", 1) > 1:
            assert command[1:3] == ["-m", "accelerate.commands.launch"]
            config_file = command[command.index("--config_file") + 1]
            assert Path(config_file).name == f"{printed['accelerate_config']}.yaml" and Path(config_file).is_file()
            assert command[command.index("--num_processes") + 1] == str(printed["num_processes"])
    else:
        algo = recipes.VERL_ALGORITHMS[printed["algorithm"]]
        assert command[1:4] == ["-m", algo.module, f"--config-name={algo.config_name}"]
        assert f"algorithm.adv_estimator={algo.adv_estimator}" in command
        assert f"actor_rollout_ref.actor.policy_loss.loss_mode={algo.loss_mode}" in command
        assert "actor_rollout_ref.rollout.name=vllm" in command


def test_dry_run_grpo_verl_baseline_uses_verl_entry_point(capsys):
    _, command, _, _ = _dry_run(capsys, "grpo_zero_math7b_verl")
    assert command[1:4] == ["-m", "verl.trainer.main_ppo", "--config-name=ppo_trainer"]


def test_overrides_reach_nested_keys_and_parse_numbers(capsys):
    printed, _, _, _ = _dry_run(capsys, "gpg_rs1_1p5b", "learning_rate=2e-6", "lr_scheduler_kwargs.min_lr_rate=0.2",
                          "reward_weights=[1, 3]", "num_processes=4", "log_completions=false")
    assert printed["learning_rate"] == 2e-6 and isinstance(printed["learning_rate"], float)
    assert printed["lr_scheduler_kwargs"] == {"min_lr_rate": 0.2}
    assert printed["reward_weights"] == [1, 3] and printed["log_completions"] is False
    assert printed["num_processes"] == 4


def test_verl_overrides_go_to_hydra_keys(capsys):
    printed, command, _, _ = _dry_run(capsys, "gpg_zero_math7b_verl", "data.train_batch_size=64",
                                "grouprl_estimator.valid_threshold=0.5")
    assert printed["overrides"]["data.train_batch_size"] == 64
    assert "data.train_batch_size=64" in command and "data.train_batch_size=144" not in command
    assert "++algorithm.grouprl.gpg.valid_threshold=0.5" in command


def test_recipe_file_with_base_path_and_overlay(tmp_path, capsys):
    """A user recipe outside the package: a relative ``base:`` path, then a bundled base by name."""
    (tmp_path / "mine.yaml").write_text("base: gpg_rs1_1p5b\nmax_steps: 7\ndescription: mine\n")
    (tmp_path / "mine2.yaml").write_text("base: mine.yaml\nseed: 3\n")
    printed, _, _, _ = _dry_run(capsys, str(tmp_path / "mine2.yaml"))
    assert printed["max_steps"] == 7 and printed["seed"] == 3 and printed["description"] == "mine"
    assert printed["gpg_preset"] == "open_rs_1p5b" and printed["recipe_name"] == "mine2"


def test_bad_recipes_give_clear_errors(tmp_path, capsys):
    assert cli.main(["train", "no_such_recipe", "--dry-run"]) == 2
    assert "grouprl list" in capsys.readouterr().err
    assert cli.main(["train", "gpg_rs1_1p5b", "learning_rate", "--dry-run"]) == 2
    assert "key=value" in capsys.readouterr().err
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(recipes.RecipeError, match="cycle"):
        recipes.resolve(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("backend: trl\ntrainer: grouprl_trl.GPGTrainer\n")
    with pytest.raises(recipes.RecipeError, match="model_name_or_path"):
        recipes.resolve(tmp_path / "c.yaml")
    with pytest.raises(recipes.RecipeError, match="algorithm"):
        recipes.resolve("gpg_zero_math7b_verl", ["algorithm=ppo"])


def test_unknown_recipe_suggests_the_closest_name(capsys):
    assert cli.main(["train", "gpg_rs1_1p5", "--dry-run"]) == 2
    assert "did you mean 'gpg_rs1_1p5b'?" in capsys.readouterr().err
    assert cli.main(["train", "tiny_cpu_gpp"]) == 2
    assert "did you mean 'tiny_cpu_gpg'?" in capsys.readouterr().err


def test_bad_yaml_in_an_override_is_a_recipe_error(capsys):
    assert cli.main(["train", "gpg_zero_math7b_verl", "data.train_files=[a", "--dry-run"]) == 2
    assert "data.train_files=[a" in capsys.readouterr().err


def test_help_names_all_four_algorithms(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("GPG", "GCPO-gold", "COPO", "GCPO-guidance"):
        assert name in text


def test_data_prepare_help_shows_the_default_format(capsys):
    with pytest.raises(SystemExit):
        cli.main(["data", "prepare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: both)" in text


def test_list_into_a_closed_pipe_exits_quietly():
    """``grouprl list | head -0``: the reader is gone before the first write; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "grouprl.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # before the child has written anything (it is still starting Python)
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert stderr == "", stderr


def test_deep_merge_and_value_parsing():
    merged = recipes.deep_merge({"a": {"x": 1, "y": 2}, "l": [1, 2]}, {"a": {"y": 3}, "l": [9]})
    assert merged == {"a": {"x": 1, "y": 3}, "l": [9]}
    assert recipes.parse_override_value("1e-6") == 1e-6
    assert recipes.parse_override_value("null") is None
    assert recipes.parse_override_value("cosine") == "cosine"
    assert recipes.parse_override_value("no") == "no" and recipes.parse_override_value("false") is False
    assert recipes._hydra_value([1, "a b"]) == "[1,'a b']"
    assert recipes._hydra_value(True) == "true" and recipes._hydra_value(None) == "null"


# ----------------------------------------------------------------------------- data / eval dispatch
@pytest.mark.parametrize("command, module", [("data", "grouprl.data"), ("eval", "grouprl.evaluate")])
def test_data_and_eval_are_delegated_untouched(command, module, monkeypatch):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv=None: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "prepare", "open-rs", "--out", "data/open-rs", "--help"]) == 3
    assert seen == [["prepare", "open-rs", "--out", "data/open-rs", "--help"]]


# ----------------------------------------------------------------------------- a real run
def test_train_tiny_cpu_gpg_end_to_end(tmp_path):
    """``grouprl train tiny_cpu_gpg`` (2 steps, console-script code path in a subprocess) trains and saves."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "grouprl.cli", "train", "tiny_cpu_gpg", "max_steps=2", f"output_dir={out}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resolved = yaml.safe_load((out / "grouprl_recipe.yaml").read_text())
    assert resolved["max_steps"] == 2 and resolved["trainer"] == "grouprl_trl.GPGTrainer"
    printed = result.stdout + result.stderr
    assert "'gpg/alpha'" in printed  # GPG's metrics were logged
    # the preflight ran first, and our summary came before TRL's first log line
    assert "preflight: all checks passed" in result.stdout
    summary = printed.index("grouprl: GPG with grouprl_trl.GPGTrainer / GPGConfig, recipe tiny_cpu_gpg")
    assert "GPGConfig: gpg_preset='paper', advantage_norm='none', age=True, valid_threshold=0.6" in printed
    assert summary < printed.index("{'loss'")

    # the saved weights moved away from the tiny model's initialisation (seed 0)
    import torch
    from transformers import AutoModelForCausalLM

    from grouprl_trl.tiny import build_tiny_model

    trained = AutoModelForCausalLM.from_pretrained(out)
    initial = build_tiny_model()
    moved = [
        name for name, param in trained.named_parameters()
        if not torch.equal(param, dict(initial.named_parameters())[name])
    ]
    assert moved, "no parameter changed: no optimizer step was taken"
