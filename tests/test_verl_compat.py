"""The upstream contract of ``grouprl_verl/_compat.py``: what grouprl relies on in verl's internals.

Each check fails by name when verl changes something grouprl overrides, calls or mirrors, so a
verl upgrade starts with a list of places to review instead of a run-time error on GPUs.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

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

    expected = {
        _compat.ppo_loss: ("config", "model_output", "data", "dp_group"),
        _compat.left_right_2_no_padding: ("data",),
        _compat.no_padding_2_padding: ("tensor", "data"),
        _compat.compute_response_mask: ("data",),
        _compat.create_rl_dataset: ("data_paths", "data_config", "tokenizer", "processor", "is_train", "max_samples"),
        _compat.create_rl_sampler: ("data_config", "dataset"),
        _compat.validate_config: ("config", "use_reference_policy", "use_critic"),
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
