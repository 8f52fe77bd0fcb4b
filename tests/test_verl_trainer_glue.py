"""GroupRLRayPPOTrainer's hooks on CPU, with a fake actor worker group in place of verl's GPU workers.

The trainer object is built without ``RayPPOTrainer.__init__`` (which starts Ray resource pools);
the methods under test only read ``config``, the options and ``actor_rollout_wg``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402

from test_verl_configs import CONFIG_DIR, MICRO_BATCH  # noqa: E402

import grouprl_verl.register  # noqa: E402,F401
from grouprl_verl import estimators  # noqa: E402
from grouprl_verl.config import algo_options  # noqa: E402
from grouprl_verl.trainer import GroupRLRayPPOTrainer  # noqa: E402


class FakeActorWG:
    """Records what the trainer sends to the actor workers."""

    def __init__(self):
        self.updates = []

    def update_actor(self, td):
        self.updates.append(td)
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.5, "pg_loss": [1.0]}})


def make_trainer(algo):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        config = compose(config_name=f"grouprl_{algo}", overrides=[MICRO_BATCH])
    trainer = object.__new__(GroupRLRayPPOTrainer)
    trainer.config = config
    trainer.grouprl_algo = algo
    trainer.grouprl_options = algo_options(config.algorithm, algo)
    trainer.actor_rollout_wg = FakeActorWG()
    trainer.skip_report = trainer._make_skip_report()  # what __init__ sets up
    trainer.global_steps = 1
    return trainer


def actor_batch(rewards, group_size, answers=None):
    n, width = len(rewards), 3
    prompts = torch.full((n, 2), 7)
    responses = torch.full((n, width), 4)
    attention = torch.ones(n, 2 + width, dtype=torch.long)
    scores = torch.zeros(n, width)
    scores[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": torch.arange(2 + width).expand(n, -1).clone(),
        "response_mask": torch.ones(n, width), "old_log_probs": torch.zeros(n, width),
        "token_level_scores": scores, "token_level_rewards": scores.clone(), "advantages": torch.ones(n, width),
    }
    non_tensors = {"uid": np.array([f"u{i // group_size}" for i in range(n)], dtype=object)}
    if answers is not None:
        non_tensors["pred"] = np.array(answers, dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def test_copo_fields_reach_the_actor_update():
    trainer = make_trainer("copo")
    estimators.LAST_METRICS.clear()
    out = trainer._update_actor(actor_batch([1, 0, 1, 1], 2, answers=["1", "2", "3", "3"]))
    (td,) = trainer.actor_rollout_wg.updates
    for key in ("grouprl_copo_local", "grouprl_copo_global", "grouprl_copo_weight"):
        assert key in td.keys()  # so grouprl_ppo_loss finds them in every micro-batch
    metrics = out.meta_info["metrics"]
    # group u0 has two different answers -> H = 1 bit, gate sigmoid(0) = .5; group u1 one answer -> H = 0
    assert metrics["copo/consistency_entropy"] == pytest.approx(0.5)
    assert metrics["copo/gate_mean"] == pytest.approx((0.5 + 1 / (1 + np.exp(5))) / 2, rel=1e-5)
    assert metrics["actor/pg_loss"] == [1.0]


def test_gpg_batch_without_signal_skips_the_update_for_real():
    trainer = make_trainer("gpg")
    out = trainer._update_actor(actor_batch([1, 1, 0, 0], 2))
    assert trainer.actor_rollout_wg.updates == []  # no optimizer step at all
    assert out.meta_info["metrics"]["grouprl/skipped_update"] == 1.0
    trainer._update_actor(actor_batch([1, 0, 0, 0], 2))
    assert len(trainer.actor_rollout_wg.updates) == 1


def test_guidance_filtered_batch_skips_without_a_negative_pass():
    trainer = make_trainer("guidance")
    trainer._negative_log_probs = lambda batch: pytest.fail("no negative pass for a batch without kept groups")
    out = trainer._update_actor(actor_batch([1, 1, 0, 0], 2))
    assert trainer.actor_rollout_wg.updates == []
    assert out.meta_info["metrics"]["guidance/kept_frac"] == 0.0


def test_guidance_weights_reach_the_actor_update():
    trainer = make_trainer("guidance")
    neg = torch.tensor([[0.0, -1.0, 0.5]] * 4)
    trainer._negative_log_probs = lambda batch: neg
    batch = actor_batch([1, 0, 1, 1], 2)
    trainer._update_actor(batch)
    (td,) = trainer.actor_rollout_wg.updates
    # group u1 (all correct) is filtered out: its rows have no loss tokens; group u0 rows are weighted
    assert td["response_mask"][:2].sum() == 6 and td["response_mask"][2:].sum() == 0
    adv = batch.batch["advantages"]
    assert torch.all(adv[2:] == 0) and not torch.allclose(adv[0], adv[0, :1].expand(3))  # token-varying weights
    assert adv[0].mean() == pytest.approx(1.0, rel=1e-5)  # weights have mean 1 per sequence and A_i = 1 here


def test_gold_ids_use_the_shared_template_and_empty_reference_rule():
    """The reference is rendered with GCPOConfig's default template, a blank reference means no gold (as in TRL),
    and a number is written with str()."""
    from grouprl_trl.tiny import build_tokenizer

    trainer = make_trainer("gcpo")
    trainer.tokenizer = tok = build_tokenizer()
    solutions = np.array(["7", "   ", None, "", np.int64(3)], dtype=object)
    batch = DataProto.from_dict(tensors={"row": torch.arange(5).unsqueeze(1)}, non_tensors={"solution": solutions})
    ids = [trainer._gold_ids(batch, i) for i in range(5)]
    assert ids[1] is None and ids[2] is None and ids[3] is None
    assert ids[0] == tok.encode("<think>\n7\n</think>\n\\boxed{7}", add_special_tokens=False)  # no EOS yet
    assert ids[4] == tok.encode("<think>\n3\n</think>\n\\boxed{3}", add_special_tokens=False)


def test_gpg_extra_rounds_stop_with_a_clear_error_when_no_full_batch_exists():
    """Defect 9: a training set without one full generation batch made _generate_round retry itself forever."""
    from types import SimpleNamespace

    trainer = make_trainer("gpg")
    trainer.train_dataset = [{"row": 0}]  # one prompt, batches of 4
    trainer.train_dataloader = SimpleNamespace(batch_size=4, collate_fn=lambda rows: rows)
    trainer._resample_loader = trainer._resample_iter = None
    with pytest.raises(ValueError, match="no full generation batch"):
        trainer._generate_round()


def test_settings_reject_guidance_with_router_replay_r3_and_row_rewrites_without_balancing():
    """Defect 8 (router replay): guidance's negative-context rows have no rollout routing to replay."""
    from omegaconf import OmegaConf

    from grouprl_verl.trainer import grouprl_settings

    def config(algo, **actor):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(config_name=f"grouprl_{algo}", overrides=[MICRO_BATCH])
        OmegaConf.set_struct(composed, False)
        composed.actor_rollout_ref.actor.merge_with(actor)
        return composed

    assert grouprl_settings(config("guidance"))[0] == "guidance"
    r3 = config("guidance", strategy="megatron", megatron={"router_replay": {"mode": "R3"}})
    with pytest.raises(ValueError, match=r"actor_rollout_ref.actor.megatron.router_replay.mode=R3"):
        grouprl_settings(r3)
    assert grouprl_settings(config("guidance", strategy="megatron", megatron={"router_replay": {"mode": "R2"}}))
    unbalanced = config("gcpo")
    unbalanced.trainer.balance_batch = False
    with pytest.raises(ValueError, match="trainer.balance_batch=false"):
        grouprl_settings(unbalanced)
