"""The wheel: built without setuptools warnings about the license, it ships the recipes, the sample
rows and the license, declares the [gpu] extra, and, installed on its own (no repository on the
path), prepares a benchmark from its sample rows and evaluates the tiny model on it, offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["pyproject.toml", "README.md", "LICENSE", "grouprl", "grouprl_core", "grouprl_trl", "grouprl_verl"]


def _run(args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, " ".join(map(str, args)) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_wheel_ships_recipes_samples_license_and_runs_offline(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the repository
    src.mkdir()
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                  "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    log = build.stdout + build.stderr
    assert not re.search(r"(?i)license.*(deprecat|warn)|(deprecat|warn).*license", log), log[-3000:]
    [wheel] = (tmp_path / "dist").glob("grouprl-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for path in (REPO / "grouprl" / "recipes").rglob("*.yaml"):
        assert path.relative_to(REPO).as_posix() in names
    from grouprl.data import SOURCES

    for name in SOURCES:
        assert any(n.startswith(f"grouprl/sample_data/{name}") and n.endswith(".jsonl") for n in names), name
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: deepspeed>=0.18.6; extra == "gpu"' in metadata
    assert 'Requires-Dist: vllm<=0.31.0,>=0.22.0; extra == "gpu"' in metadata

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
         cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    where = _run([sys.executable, "-c", "import grouprl; print(grouprl.__file__)"], cwd=work, env=env).stdout
    assert where.strip().startswith(str(site))  # the installed wheel, not the repository
    _run([sys.executable, "-m", "grouprl.cli", "data", "prepare", "aime24", "--source", "sample",
          "--out", "data/aime24"], cwd=work, env=env)
    assert (work / "data/aime24/dataset_dict.json").is_file() and (work / "data/aime24/test.parquet").is_file()
    _run([sys.executable, "-m", "grouprl_trl.tiny", "--save", "tiny"], cwd=work, env=env)
    _run([sys.executable, "-m", "grouprl.cli", "eval", "--model", "tiny", "--data-dir", "data", "--benchmarks",
          "aime24", "--backend", "hf", "--max-new-tokens", "4", "--limit", "2", "--out", "results"], cwd=work, env=env)
    result = json.loads((work / "results/results.json").read_text())
    assert result["benchmarks"]["aime24"]["problems"] == 2
    assert result["template"] == "lighteval-math"  # the benchmark's default, recorded (was null)
