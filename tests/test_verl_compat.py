"""The upstream contract of ``grouprl_verl/_compat.py``: what grouprl relies on in verl's internals.

Each check fails by name when verl changes something grouprl overrides, calls or mirrors, so a
verl upgrade starts with a list of places to review instead of a run-time error on GPUs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from verl import DataProto  # noqa: E402

from grouprl_verl import _compat  # noqa: E402


def parameters(fn) -> tuple[str, ...]:
    # Ray adds a ``_ray_trace_ctx`` keyword to the methods of classes it wraps as actors
    return tuple(p for p in inspect.signature(fn).parameters if p != "_ray_trace_ctx")


def test_installed_verl_is_a_supported_version_and_others_are_refused(monkeypatch):
    assert verl.__version__ in _compat.SUPPORTED_VERL_VERSIONS
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(ImportError, match=r"supports verl 0\.9\.1, found verl 0\.10\.0"):
        importlib.reload(_compat)
    monkeypatch.undo()
    importlib.reload(_compat)


@pytest.mark.parametrize("name", sorted(_compat.TRAINER_METHODS))
def test_ray_ppo_trainer_methods_grouprl_overrides_or_calls(name):
    method = getattr(_compat.RayPPOTrainer, name, None)
    assert method is not None, f"RayPPOTrainer.{name} is gone"
    assert parameters(method) == _compat.TRAINER_METHODS[name], f"RayPPOTrainer.{name} changed its parameters"


def test_helpers_grouprl_calls_keep_their_parameters():
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.experimental.agent_loop import AgentLoopManager
    from verl.experimental.reward_loop import RewardLoopManager
    from verl.trainer.main_ppo import run_ppo

    expected = {
        _compat.ppo_loss: ("config", "model_output", "data", "dp_group"),
        _compat.left_right_2_no_padding: ("data",),
        _compat.no_padding_2_padding: ("tensor", "data"),
        _compat.compute_response_mask: ("data",),
        _compat.create_rl_dataset: ("data_paths", "data_config", "tokenizer", "processor", "is_train", "max_samples"),
        _compat.create_rl_sampler: ("data_config", "dataset"),
        _compat.validate_config: ("config", "use_reference_policy", "use_critic"),
        _compat.auto_set_device: ("config",),
        _compat.BaseTaskRunner.add_actor_rollout_worker: ("self", "config"),
        _compat.BaseTaskRunner.add_critic_worker: ("self", "config"),
        _compat.BaseTaskRunner.add_reward_model_resource_pool: ("self", "config"),
        _compat.BaseTaskRunner.add_teacher_model_resource_pool: ("self", "config"),
        _compat.BaseTaskRunner.add_ref_policy_worker: ("self", "config", "ref_policy_cls"),
        _compat.BaseTaskRunner.init_resource_pool_mgr: ("self", "config"),
        RewardLoopManager.compute_rm_score: ("self", "data"),
        CheckpointEngineManager.update_weights: ("self", "global_steps"),
        CheckpointEngineManager.sleep_replicas: ("self",),
        AgentLoopManager.generate_sequences: ("self", "prompts"),
        run_ppo: ("config", "task_runner_class"),  # grouprl_verl.main_ppo passes its own task runner
    }
    for fn, names in expected.items():
        assert parameters(fn) == names, f"{fn.__qualname__} changed its parameters"


@pytest.mark.parametrize("upstream", sorted(_compat.MIRRORED))
def test_code_grouprl_mirrors_is_unchanged(upstream):
    """grouprl copies the order of calls of these verl functions; a change upstream needs a review there."""
    ours, digest = _compat.MIRRORED[upstream]
    module, _, qualname = upstream.rpartition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
        obj = getattr(obj, "__ray_actor_class__", obj)  # verl's @ray.remote TaskRunner
    source = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    assert source == digest, f"verl changed {upstream}: review {ours}, then update the hash in _compat.MIRRORED"


def test_fit_reads_rewards_by_reference_so_in_place_rewrites_reach_it():
    """``fit`` takes ``rm_scores`` and the reward-extra arrays before ``_compute_old_log_prob``; the hooks write
    into those very objects (tensor rows, object arrays made in ``_balance_batch``)."""
    from verl.trainer.ppo.reward import extract_reward

    batch = DataProto.from_dict(tensors={"rm_scores": torch.zeros(2, 3)},
                                non_tensors={"pred": np.array(["1", "2"], dtype=object)},
                                meta_info={"reward_extra_keys": ["pred"]})
    scores, extras = extract_reward(batch)
    assert scores is batch.batch["rm_scores"] and extras["pred"] is batch.non_tensor_batch["pred"]


def test_select_idxs_shares_meta_info_which_concat_requires_to_agree():
    """Why GPG's assembler clears the pieces' meta_info before ``DataProto.concat`` (defect 3)."""
    a = DataProto.from_dict(tensors={"x": torch.zeros(2, 1)}, meta_info={"global_token_num": [1, 2]})
    b = DataProto.from_dict(tensors={"x": torch.ones(2, 1)}, meta_info={"global_token_num": [3, 4]})
    piece = a.select_idxs(np.array([0]))
    assert piece.meta_info == a.meta_info
    with pytest.raises(AssertionError, match="Conflicting values for meta_info key 'global_token_num'"):
        DataProto.concat([piece, b.select_idxs(np.array([1]))])


# ----------------------------------------------------------------------------- private names outside _compat
REPO = Path(__file__).resolve().parents[1]
# verl modules grouprl may import anywhere: the top level (DataProto), the estimator / policy-loss registries,
# the config dataclasses a Hydra ``_target_`` names, and the launcher whose task_runner_class grouprl sets.
# Every other verl module is internal: only grouprl_verl/_compat.py imports from it.
PUBLIC_VERL_MODULES = {"verl", "verl.trainer.ppo.core_algos", "verl.base_config", "verl.workers.config",
                       "verl.trainer.main_ppo"}
SCANNED = sorted(p.relative_to(REPO).as_posix() for folder in ("grouprl", "grouprl_core", "grouprl_trl", "grouprl_verl",
                                                             "bench")
                 for p in (REPO / folder).glob("*.py") if p.name != "_compat.py")  # the TRL one names TRL's


@functools.cache
def verl_private_names() -> frozenset[str]:
    """Private names of the verl classes grouprl extends or handles (methods and attributes, also those only
    assigned as ``self._x``) and of the public modules grouprl imports from."""
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo import ray_trainer

    names = set()
    for cls in (_compat.RayPPOTrainer, main_ppo_v0.TaskRunner.__ray_actor_class__, DataProto):
        names |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
    for module in (ray_trainer, main_ppo_v0, inspect.getmodule(DataProto)):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    for name in PUBLIC_VERL_MODULES:
        names |= {n for n in vars(importlib.import_module(name)) if n.startswith("_") and not n.startswith("__")}
    return frozenset(names)


def private_verl_uses(path: Path, private: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            found += [f"{path.name}:{item.lineno}: def {item.name}" for item in node.body
                      if isinstance(item, ast.FunctionDef) and item.name in private]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "verl":
            if node.module not in PUBLIC_VERL_MODULES:
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            found += [f"{path.name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "verl" and a.name not in PUBLIC_VERL_MODULES]
    return found


def test_the_private_name_scan_catches_a_private_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import verl.utils.torch_functional as verl_F\n"
        "from verl.trainer.ppo.ray_trainer import RayPPOTrainer\n"
        "from verl import DataProto\n"
        "class T(RayPPOTrainer):\n"
        "    def _update_actor(self, batch):\n"
        "        return self._balance_batch(batch, metrics={})\n"
    )
    found = private_verl_uses(sample, verl_private_names())
    assert len(found) == 4, found


@pytest.mark.parametrize("path", SCANNED)
def test_no_module_but_compat_names_a_private_verl_symbol(path):
    assert private_verl_uses(REPO / path, verl_private_names()) == []
