"""grouprl_core.algorithms, the one table of algorithms: every name in it is real (TRL classes, verl's
registries, grouprl_verl's Hydra configs), the README's two algorithm tables say the same, and the lists
that used to be kept by hand (demo, bench, recipes, verl trainer) are read from it."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from grouprl_core.algorithms import ALGORITHMS, GRPO, Algorithm, by_verl_estimator

REPO = Path(__file__).resolve().parents[1]
EVERY = [GRPO, *ALGORITHMS.values()]


# ----------------------------------------------------------------------------- the names exist
def trl_problems(algo: Algorithm) -> list[str]:
    from trl import GRPOConfig, GRPOTrainer

    try:
        module = importlib.import_module(algo.trl_module)
    except ImportError as err:
        return [f"{algo.key}: trl_module {algo.trl_module!r} does not import ({err})"]
    trainer = getattr(module, algo.trl_trainer, None)
    config = getattr(module, algo.trl_config, None)
    problems = []
    if not (isinstance(trainer, type) and issubclass(trainer, GRPOTrainer)):
        problems.append(f"{algo.key}: {algo.trl_module}.{algo.trl_trainer} is not a GRPOTrainer class")
    if not (isinstance(config, type) and issubclass(config, GRPOConfig)):
        problems.append(f"{algo.key}: {algo.trl_module}.{algo.trl_config} is not a GRPOConfig class")
    if not problems and algo is not GRPO and trainer.config_class is not config:
        problems.append(f"{algo.key}: {algo.trl_trainer}.config_class is {trainer.config_class.__name__}")
    return problems


def verl_problems(algo: Algorithm) -> list[str]:
    import grouprl_verl.register  # noqa: F401  (what the verl.plugins entry point runs)
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    keys, problems = algo.verl, []
    for kind, name, registry in (("adv_estimator", keys.adv_estimator, ADV_ESTIMATOR_REGISTRY),
                                 ("loss_mode", keys.loss_mode, POLICY_LOSS_REGISTRY)):
        if name not in registry:
            problems.append(f"{algo.key}: {kind} {name!r} is not in verl's registry")
        elif name.startswith("grouprl_") and not registry[name].__module__.startswith("grouprl_verl."):
            problems.append(f"{algo.key}: {kind} {name!r} is registered by {registry[name].__module__}")
    if importlib.util.find_spec(keys.module) is None:
        problems.append(f"{algo.key}: entry point {keys.module!r} not found")
    if keys.module != "grouprl_verl.main_ppo":
        return problems
    # grouprl_verl's base config selects the same estimator and loss and declares the options block
    path = REPO / "grouprl_verl" / "configs" / f"{keys.config_name}.yaml"
    if not path.is_file():
        return problems + [f"{algo.key}: no Hydra config {path.relative_to(REPO)}"]
    config = yaml.safe_load(path.read_text())
    if config["algorithm"]["adv_estimator"] != keys.adv_estimator:
        problems.append(f"{algo.key}: {path.name} sets adv_estimator {config['algorithm']['adv_estimator']!r}")
    loss_mode = config["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"]
    if loss_mode != keys.loss_mode:
        problems.append(f"{algo.key}: {path.name} sets loss_mode {loss_mode!r}")
    if keys.params not in config["algorithm"].get("grouprl", {}):
        problems.append(f"{algo.key}: {path.name} has no algorithm.grouprl.{keys.params} block")
    return problems


@pytest.mark.parametrize("algo", EVERY, ids=lambda a: a.key)
def test_trl_classes_in_the_table_exist(algo):
    assert trl_problems(algo) == []


@pytest.mark.parametrize("algo", EVERY, ids=lambda a: a.key)
def test_verl_names_in_the_table_are_registered_and_match_the_configs(algo):
    pytest.importorskip("verl")
    assert verl_problems(algo) == []


def test_a_misspelt_name_is_reported():
    gpg = ALGORITHMS["gpg"]
    misspelt = [
        dataclasses.replace(gpg, trl_trainer="GPGTrainr"),
        dataclasses.replace(gpg, trl_config="GCPOConfig"),  # exists, but is another trainer's config
        dataclasses.replace(gpg, trl_module="grouprl_trl.gpgg"),
    ]
    for algo in misspelt:
        assert trl_problems(algo), algo
    if importlib.util.find_spec("verl") is not None:
        for change in ({"loss_mode": "grouprl_gp"}, {"adv_estimator": "grouprl_gcpo"}, {"config_name": "grouprl_gpgg"},
                       {"params": "gcpo"}):
            assert verl_problems(dataclasses.replace(gpg, verl=dataclasses.replace(gpg.verl, **change))), change


def test_the_verl_options_classes_cover_every_algorithm():
    pytest.importorskip("verl")
    from grouprl_verl.config import ALGO_OPTIONS

    assert set(ALGO_OPTIONS) == {a.verl.params for a in ALGORITHMS.values()}


# ----------------------------------------------------------------------------- the README agrees
def markdown_table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_algorithm_table_matches():
    rows = markdown_table(README, "| algorithm | paper | TRL trainer / config |")
    assert [re.match(r"\*\*(.+?)\*\*", row[0]).group(1) for row in rows] == [a.label for a in ALGORITHMS.values()]
    for row, algo in zip(rows, ALGORITHMS.values()):
        assert row[1] == algo.paper.citation
        assert code_spans(row[2]) == [algo.trl_trainer, algo.trl_config]
        assert code_spans(row[3]) == [algo.verl.adv_estimator, algo.verl.loss_mode]


def test_readme_verl_table_matches():
    rows = markdown_table(README, "| algorithm | `algorithm.adv_estimator` |")
    assert [row[0] for row in rows] == [a.label for a in ALGORITHMS.values()]
    for row, algo in zip(rows, ALGORITHMS.values()):
        assert [code_spans(cell) for cell in row[1:]] == [[algo.verl.adv_estimator], [algo.verl.loss_mode],
                                                          [algo.verl.config_name]]


def test_the_readme_check_catches_a_changed_row():
    changed = README.replace("`GCPOTrainer` / `GCPOConfig`", "`GCPOTrainer` / `GPGConfig`", 1)
    rows = markdown_table(changed, "| algorithm | paper | TRL trainer / config |")
    assert code_spans(rows[1][2]) != [ALGORITHMS["gcpo_gold"].trl_trainer, ALGORITHMS["gcpo_gold"].trl_config]


# ----------------------------------------------------------------------------- the lists read the table
def test_demo_bench_recipes_and_verl_trainer_read_the_table():
    import bench.registry
    from grouprl import recipes
    from grouprl_trl import demo, trl_classes

    assert demo.ALGOS == ("grpo", "gpg", "gcpo_gold", "copo", "guidance")
    assert [demo.LABELS[k] for k in demo.ALGOS] == ["GRPO (TRL)", "GPG", "GCPO-gold", "COPO", "GCPO-guidance"]
    for key, algo in ALGORITHMS.items():
        spec = bench.registry.ALGORITHMS[key]
        assert (spec.label, spec.module, spec.trainer, spec.config) == (
            algo.label, algo.trl_module, algo.trl_trainer, algo.trl_config)
        assert [cls.__name__ for cls in trl_classes(key)] == [algo.trl_trainer, algo.trl_config]
        assert trl_classes(key)[0].paper == {"title": algo.paper.title, "id": algo.paper.arxiv}  # TRL's model card
        assert recipes.VERL_ALGORITHMS[key] is algo.verl
        assert recipes.algorithm_name({"backend": "verl", "algorithm": key}) == algo.label
        assert recipes.algorithm_name({"backend": "trl", "trainer": f"grouprl_trl.{algo.trl_trainer}"}) == algo.label
        assert by_verl_estimator(algo.verl.adv_estimator) is algo
    assert recipes.algorithm_name({"backend": "trl", "trainer": "trl.GRPOTrainer"}) == "GRPO (TRL baseline)"
    assert recipes.algorithm_name({"backend": "verl", "algorithm": "grpo"}) == "GRPO (verl baseline)"
    assert by_verl_estimator("grpo") is None


def test_verl_trainer_maps_each_estimator_to_its_options_block():
    pytest.importorskip("verl")
    from grouprl_verl import estimators, losses, trainer

    assert trainer.ESTIMATOR_TO_ALGO == {"grouprl_gpg": "gpg", "grouprl_gcpo": "gcpo", "grouprl_copo": "copo",
                                         "grouprl_guidance": "guidance"}
    assert estimators.ESTIMATOR_NAMES == ("grouprl_gpg", "grouprl_gcpo", "grouprl_copo", "grouprl_guidance")
    assert losses.LOSS_NAMES == ("grouprl_pg", "grouprl_copo", "grouprl_guidance")


def test_the_table_loads_without_torch():
    """The grouprl CLI reads the table (recipes.py) and must not import torch."""
    import os
    import subprocess
    import sys

    code = ("import sys, grouprl_core.algorithms, grouprl.recipes; "
            "heavy = [m for m in ('torch', 'trl', 'verl') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
