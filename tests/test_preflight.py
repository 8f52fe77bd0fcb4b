"""The preflight of ``grouprl train``: each failure class exits non-zero with the field and the fix,
before anything is spawned; ``--force`` skips only the hardware comparison.

The GPU probe (a child process asking torch) is replaced by a fixed machine: the one stand-in for
hardware. Missing packages are simulated with ``sys.modules[name] = None`` (``find_spec`` then
answers "not installed" and ``import`` fails). GPU-only packages a CPU machine cannot install
(DeepSpeed, vLLM, flash-attn) are declared present where a test needs every other check to pass.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grouprl import cli, extras, preflight, recipes

NO_GPU = preflight.Machine(())
EIGHT_H100 = preflight.Machine((85.0,) * 8)  # what an 80 GB card reports (GB = 1e9 bytes)
GPU_ONLY_PACKAGES = {"deepspeed", "vllm", "flash_attn"}


@pytest.fixture
def machine(monkeypatch):
    """Set the machine the preflight sees (default: no GPU); returns the setter."""
    def use(m):
        monkeypatch.setattr(preflight, "detect_machine", lambda: m)
    use(NO_GPU)
    return use


@pytest.fixture
def gpu_packages_present(monkeypatch):
    real = preflight.is_installed
    monkeypatch.setattr(preflight, "is_installed", lambda m: m in GPU_ONLY_PACKAGES or real(m))


def _lines(report: str, status: str = "FAIL") -> list[str]:
    return [line.strip() for line in report.splitlines() if line.startswith(f"  {status} ")]


def _dry_run(capsys, *args) -> tuple[int, str]:
    code = cli.main(["train", *args, "--dry-run"])
    out = capsys.readouterr().out
    return code, out.partition("# preflight\n")[2]


# ----------------------------------------------------------------------------- typos and types
def test_typo_in_a_trl_recipe_suggests_the_field(capsys, machine):
    code, report = _dry_run(capsys, "tiny_cpu_gpg", "valid_treshold=0.5")
    assert code == 1
    assert _lines(report) == [
        "FAIL  config    valid_treshold: not a field of RecipeArguments, GPGConfig or ModelConfig; "
        "did you mean 'valid_threshold'?"
    ]


def test_bad_types_name_the_field(capsys, machine):
    code, report = _dry_run(capsys, "tiny_cpu_gpg", "learning_rate=abc", "num_generations=2.5", "use_vllm=maybe",
                            "valid_treshold=1")
    assert code == 1
    fails = _lines(report)
    assert "FAIL  config    learning_rate='abc': expected float" in fails
    assert "FAIL  config    num_generations=2.5: expected int | None" in fails
    assert "FAIL  config    use_vllm='maybe': expected bool" in fails
    assert len(fails) == 4  # every problem at once, not the first only


def test_values_the_config_class_rejects_are_reported(capsys, machine):
    """Types fine, value wrong: the real build (TrlParser -> GPGConfig.__post_init__) runs in the preflight."""
    code, report = _dry_run(capsys, "tiny_cpu_gpg", "advantage_norm=sometimes")
    assert code == 1
    [line] = _lines(report)
    assert line.startswith("FAIL  config    GPGConfig: ") and "advantage_norm" in line and "sometimes" in line


def test_verl_typos_in_our_section_and_in_verl_keys(capsys, machine):
    code, report = _dry_run(capsys, "gpg_zero_math7b_verl", "grouprl_estimator.valid_treshold=0.5",
                            "data.train_bach_size=64")
    assert code == 1
    config = [line for line in _lines(report) if " config " in line]
    assert config[0].startswith("FAIL  config    algorithm.grouprl.gpg.valid_treshold: unknown key; "
                                "did you mean 'valid_threshold'?")
    assert config[1] == ("FAIL  config    data.train_bach_size: not a key of verl's grouprl_gpg config; "
                         "did you mean 'data.train_batch_size'?")


def test_verl_bad_types(capsys, machine):
    code, report = _dry_run(capsys, "gpg_zero_math7b_verl", "grouprl_estimator.valid_threshold=abc",
                            "data.train_batch_size=abc", "grouprl_policy_loss.entropy_penalty_cof=0.1")
    assert code == 1
    config = [line for line in _lines(report) if " config " in line]
    assert "FAIL  config    data.train_batch_size='abc': expected a number (the base config has 1024)" in config
    assert any(line.startswith("FAIL  config    actor_rollout_ref.actor.policy_loss.grouprl.entropy_penalty_cof: "
                               "unknown key; did you mean 'entropy_penalty_coef'?") for line in config)


def test_verl_value_checks_of_grouprl_verl_and_verl_run(capsys, machine):
    """Known keys, right types, wrong values: grouprl_verl's validation, then verl's validate_config."""
    _, report = _dry_run(capsys, "gpg_zero_math7b_verl", "grouprl_estimator.valid_threshold=1.5")
    assert "FAIL  config    algorithm.grouprl.gpg.valid_threshold: beta_th must be in [0, 1], got 1.5" in _lines(report)
    _, report = _dry_run(capsys, "gpg_zero_math7b_verl", "actor_rollout_ref.actor.use_dynamic_bsz=false")
    [line] = [line for line in _lines(report) if " config " in line]
    assert line.startswith("FAIL  config    verl: ") and "micro_batch_size" in line
    _, report = _dry_run(capsys, "gpg_zero_math7b_verl")
    assert any(" config " in line for line in _lines(report, "ok"))


# ----------------------------------------------------------------------------- data
def test_missing_trl_data_prints_the_prepare_command_that_fixes_it(capsys, machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, report = _dry_run(capsys, "gpg_rs3_1p5b", "model_name_or_path=tiny")
    assert code == 1
    command = "grouprl data prepare open-rs --out data/open-rs"
    assert f"FAIL  data      dataset_path data/open-rs does not exist; make it with: {command}" in _lines(report)
    # run that command (offline: --source sample) and the data check passes
    assert cli.main([*command.split()[1:], "--source", "sample"]) == 0
    capsys.readouterr()
    _, report = _dry_run(capsys, "gpg_rs3_1p5b", "model_name_or_path=tiny")
    assert "ok    data      dataset_path: data/open-rs" in _lines(report, "ok")
    assert not any(" data " in line for line in _lines(report))


def test_missing_verl_data_prints_the_prepare_command(capsys, machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, report = _dry_run(capsys, "gpg_zero_math7b_verl")
    assert ("FAIL  data      data.train_files: data/dapo-math-17k/train.parquet does not exist; make it with: "
            "grouprl data prepare dapo-math-17k --out data/dapo-math-17k --format verl") in _lines(report)
    assert cli.main(["data", "prepare", "aime24", "--out", "data/aime24", "--format", "verl", "--source", "sample"]) == 0
    capsys.readouterr()
    _, report = _dry_run(capsys, "gpg_zero_math7b_verl")
    assert "ok    data      data.val_files: data/aime24/test.parquet" in _lines(report, "ok")


def test_a_folder_that_is_not_a_dataset_is_reported(capsys, machine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "open-rs").mkdir(parents=True)
    _, report = _dry_run(capsys, "gpg_rs3_1p5b")
    assert any(line.startswith("FAIL  data      dataset_path data/open-rs is not a datasets save_to_disk folder")
               for line in _lines(report))


# ----------------------------------------------------------------------------- model
def test_model_paths_and_hub_ids(capsys, machine, tmp_path):
    from grouprl_trl.tiny import save_tiny_model

    def model_line(value):
        _, report = _dry_run(capsys, "tiny_cpu_gpg", f"model_name_or_path={value}")
        [line] = [line.strip() for line in report.splitlines() if " model " in line]
        return line

    assert model_line(str(tmp_path / "nope")).startswith(f"FAIL  model     model_name_or_path: {tmp_path / 'nope'} "
                                                         "does not exist")
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in model_line(str(tmp_path / "empty"))
    save_tiny_model(tmp_path / "tiny_model")
    assert model_line(str(tmp_path / "tiny_model")).startswith("ok    model     model_name_or_path: local model folder")
    assert "neither a local folder nor a valid hub id" in model_line("org/na me")
    # a well-formed id that is not cached, offline: an error before any download is tried
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in model_line("someorg/some-model")


# ----------------------------------------------------------------------------- extras
@pytest.mark.parametrize("module, extra", [("hydra", "verl"), ("ray", "verl"), ("verl", "verl")])
def test_verl_recipe_without_verl_extra_names_it(capsys, machine, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    code, report = _dry_run(capsys, "gpg_zero_math7b_verl")
    assert code == 1
    assert (f"FAIL  extras    {module} (needed by verl recipes) is not installed: "
            f'pip install "grouprl[{extra}]"') in _lines(report)
    assert "skip  config    not composed: install the missing packages above first" in _lines(report, "skip")


def test_zero_recipe_without_deepspeed_names_the_gpu_extra(capsys, machine, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    _, report = _dry_run(capsys, "gpg_rs1_1p5b")
    assert ('FAIL  extras    deepspeed (needed by accelerate_config zero2) is not installed: '
            'pip install "grouprl[gpu]"') in _lines(report)
    assert ('FAIL  extras    vllm (needed by use_vllm: true) is not installed: pip install "grouprl[gpu]"'
            in _lines(report)) == (not extras.is_installed("vllm"))


def test_trl_missing_skips_the_config_build(capsys, machine, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    code, report = _dry_run(capsys, "tiny_cpu_gpg")
    assert code == 1
    assert _lines(report) == ['FAIL  extras    trl (needed by TRL recipes) is not installed: pip install "grouprl[trl]"']


def test_module_not_found_in_subcommands_names_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    code = cli.main(["data", "prepare", "aime24", "--source", "sample", "--out", str(tmp_path / "a"), "--format", "trl"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "grouprl data needs the Python package 'datasets', which is not installed: pip install \"grouprl[trl]\"")
    from grouprl import train_trl

    monkeypatch.setitem(sys.modules, "trl", None)
    path = tmp_path / "r.yaml"
    path.write_text(recipes.dump(recipes.resolve("tiny_cpu_gpg")))
    with pytest.raises(SystemExit, match=r'grouprl.train_trl needs .*\'trl\'.*pip install "grouprl\[trl\]"'):
        train_trl.main(["--config", str(path)])


def test_install_commands():
    assert extras.install_command("hydra.core") == 'pip install "grouprl[verl]"'
    assert extras.install_command("math_verify") == 'pip install "grouprl[trl]"'
    assert extras.install_command("flash_attn") == "pip install flash-attn --no-build-isolation"
    assert extras.install_command("numpy") is None


# ----------------------------------------------------------------------------- hardware and --force
def _gpu_recipe_args():
    # everything but the hardware passes: the embedded model and toy data
    return ["gpg_rs1_1p5b", "model_name_or_path=tiny", "dataset_path=toy"]


def test_hardware_gap_is_reported_and_force_skips_only_it(capsys, machine, gpu_packages_present):
    machine(preflight.Machine((40.0, 40.0)))
    code, report = _dry_run(capsys, *_gpu_recipe_args())
    assert code == 1
    assert _lines(report) == [
        "FAIL  hardware  needs 8 GPUs with >= 80 GB each; this machine has 2 GPU(s) with 40, 40 GB. With fewer "
        "GPUs set num_processes=N and raise gradient_accumulation_steps to keep the batch; --force skips this check"
    ]
    machine(preflight.Machine((40.0,) * 8))  # enough GPUs, too small
    code, report = _dry_run(capsys, *_gpu_recipe_args())
    assert code == 1 and _lines(report)[0].startswith("FAIL  hardware  needs 8 GPUs with >= 80 GB each; this "
                                                      "machine has 8 GPU(s)")
    machine(EIGHT_H100)
    code, report = _dry_run(capsys, *_gpu_recipe_args())
    assert code == 0 and _lines(report) == []
    # the config objects are built without touching the GPUs (a CUDA context here would last the whole run)
    assert any(line.startswith("ok    config") and line.endswith("(built with use_cpu: the launcher leaves the GPUs "
                                                                "alone)") for line in _lines(report, "ok"))
    assert ("ok    hardware  needs 8 GPUs with >= 80 GB each; this machine has 8 GPU(s) with "
            "85, 85, 85, 85, 85, 85, 85, 85 GB") in _lines(report, "ok")
    # --force: the gap is not compared; every other check still runs and still fails
    machine(preflight.Machine((40.0, 40.0)))
    assert _dry_run(capsys, *_gpu_recipe_args(), "--force")[0] == 0
    code, report = _dry_run(capsys, *_gpu_recipe_args(), "valid_treshold=1", "--force")
    assert code == 1
    assert [line.split()[1] for line in _lines(report)] == ["config"]
    assert "skip  hardware  needs 8 GPUs with >= 80 GB each; not compared with this machine (--force)" in \
        _lines(report, "skip")


def test_fewer_processes_need_fewer_gpus(capsys, machine, gpu_packages_present):
    machine(preflight.Machine((85.0, 85.0)))
    code, report = _dry_run(capsys, *_gpu_recipe_args(), "num_processes=2", "gradient_accumulation_steps=32")
    assert code == 0, report


def test_a_failing_gpu_probe_is_a_report_line(capsys, monkeypatch, gpu_packages_present):
    def broken():
        raise RuntimeError("no driver")

    monkeypatch.setattr(preflight, "detect_machine", broken)
    code, report = _dry_run(capsys, *_gpu_recipe_args())
    assert code == 1
    assert _lines(report) == ["FAIL  hardware  needs 8 GPUs with >= 80 GB each; could not read this machine's GPUs "
                              "(no driver); --force skips this check"]


def test_detect_machine_asks_torch():
    import torch

    found = preflight.detect_machine()
    assert len(found.gpu_memory_gb) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ----------------------------------------------------------------------------- real launches
def test_a_failed_preflight_spawns_nothing(capsys, machine, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    spawned = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: spawned.append(a) or 0)
    assert cli.main(["train", "gpg_zero_math7b_verl"]) == 1  # no GPU, no data, model not cached
    assert cli.main(["train", "tiny_cpu_gpg", "learning_rate=abc"]) == 1
    assert spawned == [] and not (tmp_path / "outputs").exists()
    out = capsys.readouterr().out
    assert out.count("problems (FAIL above); nothing was started") == 1  # the verl one; the TRL one has 1
    assert "FAIL  config    learning_rate='abc': expected float" in out


def test_a_passing_preflight_launches_once_with_our_summary_first(capsys, machine, gpu_packages_present,
                                                                  monkeypatch, tmp_path):
    """verl: our summary is printed before the entry point starts (whose output is Ray's and verl's)."""
    from grouprl_trl.tiny import save_tiny_model

    monkeypatch.chdir(tmp_path)
    model = save_tiny_model(tmp_path / "tiny")
    assert cli.main(["data", "prepare", "aime24", "--source", "sample", "--out", "data/aime24", "--format", "verl"]) == 0
    spawned = []
    monkeypatch.setattr(subprocess, "call", lambda command, **k: spawned.append(command) or 0)
    machine(preflight.Machine((85.0,)))
    assert cli.main(["train", "gpg_zero_math7b_verl", f"actor_rollout_ref.model.path={model}",
                     "data.train_files=data/aime24/test.parquet", "trainer.n_gpus_per_node=1"]) == 0
    out = capsys.readouterr().out
    assert "preflight: all checks passed" in out
    summary = out.index("grouprl: GPG on verl (estimator grouprl_gpg, policy loss grouprl_pg), recipe "
                        "gpg_zero_math7b_verl")
    assert "algorithm.grouprl.gpg: f_norm='none', use_age=True, valid_threshold=0.6" in out
    assert summary < out.index("$ ")  # before the command line that starts verl
    [command] = spawned
    assert command[1:4] == ["-m", "grouprl_verl.main_ppo", "--config-name=grouprl_gpg"]


def test_preflight_leaves_the_environment_as_it_found_it():
    """The launch gets os.environ: what importing verl / Ray sets there at import time (verl 0.9.1 sets
    TORCH_CUDA_ARCH_LIST=8.0 on a machine without CUDA) must not leak into it. A fresh interpreter, so
    that the imports really happen during the check."""
    import os

    code = ("import os, json; before = dict(os.environ)\n"
            "from grouprl import preflight, recipes\n"
            "preflight.run(recipes.resolve('gpg_zero_math7b_verl'), machine_fn=lambda: preflight.Machine(()))\n"
            "after = dict(os.environ)\n"
            "print(json.dumps({k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}))")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "{}"


def test_conforms_mirrors_the_argparse_conversions():
    from typing import Literal

    assert preflight.conforms(1, float) and preflight.conforms("1e-6", float) and not preflight.conforms(True, float)
    assert preflight.conforms(3, int) and not preflight.conforms(2.5, int) and not preflight.conforms("x", int)
    assert preflight.conforms("no", bool) and preflight.conforms(False, bool) and not preflight.conforms("maybe", bool)
    assert preflight.conforms(None, int | None) and preflight.conforms([1, 2.5], list[float])
    assert not preflight.conforms(["a"], list[float]) and preflight.conforms({"a": 1}, dict | str | None)
    assert preflight.conforms("a", Literal["a", "b"]) and not preflight.conforms("c", Literal["a", "b"])
