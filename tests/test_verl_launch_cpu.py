"""`python -m grouprl_verl.main_ppo` as a user launches it, on a machine without GPUs.

verl 0.9.1 cannot train on CPU (its Ray resource pool needs GPUs, its FSDP engines register only
for cuda/npu, its rollouts are inference servers), so this run must stop when verl allocates the
GPU workers. Everything before that point is ours or verl's real launch path and must succeed:
Hydra composition of our config, our config checks, verl's config validation, our Ray task runner,
dataset loading from a `grouprl data prepare` parquet and the construction of *our* trainer, which
says so in the log. (`tests/test_verl_fit_cpu.py` runs the same task runner through `fit()` with CPU
stand-ins for the GPU parts.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path, *extra):
    from grouprl.data import main as data_main
    from grouprl_trl.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    assert data_main(["prepare", "aime24", "--source", str(ROOT / "tests/fixtures/aime24.jsonl"),
                      "--out", str(tmp_path / "aime24"), "--format", "verl"]) == 0
    parquet = tmp_path / "aime24" / "test.parquet"
    overrides = [
        f"data.train_files={parquet}", f"data.val_files={parquet}",
        f"actor_rollout_ref.model.path={model_dir}",
        "data.train_batch_size=2", "data.max_prompt_length=64", "data.max_response_length=8",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.logger=[console]",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        *extra,
    ]
    # hide any GPU so the run behaves the same on every machine; no HYDRA_FULL_ERROR: the user's view
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "grouprl_verl.main_ppo", "--config-name", "grouprl_gpg", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_main_ppo_builds_grouprl_trainer_up_to_gpu_worker_allocation(tmp_path):
    code, out = launch(tmp_path)
    assert code != 0
    # our task runner built our trainer (verl's plain RayPPOTrainer prints no such line) ...
    assert "grouprl: GroupRLRayPPOTrainer, algorithm=gpg (grouprl_gpg / grouprl_pg)" in out, out[-3000:]
    # ... whose init_workers reached verl's GPU allocation, which fails on this machine
    assert os.path.join("grouprl_verl", "trainer.py") in out and "init_workers" in out, out[-3000:]
    assert "Total available GPUs 0 is less than total desired GPUs 1" in out, out[-3000:]


def test_main_ppo_rejects_a_misspelled_grouprl_key_before_ray_starts(tmp_path):
    code, out = launch(tmp_path, "++algorithm.grouprl.gpg.valid_treshold=0.5")
    assert code != 0
    assert "algorithm.grouprl.gpg: unknown key(s) ['valid_treshold']" in out, out[-3000:]
    assert "ray init kwargs" not in out and "Total available GPUs" not in out, out[-3000:]
