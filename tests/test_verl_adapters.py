"""grouprl's verl estimators and losses, called the way verl 0.9.1 calls them.

Estimators go through verl's own ``verl.trainer.ppo.ray_trainer.compute_advantage`` on DataProto
batches (uids in verl's interleaved layout, reward on the last response token); losses through
the keyword signature that ``verl.workers.utils.losses.ppo_loss`` uses, with a real
``ActorConfig``. Expected numbers are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY, agg_loss, get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import grouprl_verl.register  # noqa: E402,F401  (explicit here; the entry point is tested separately)
from grouprl_verl import estimators, losses  # noqa: E402
from grouprl_verl.config import GroupRLPolicyLossConfig, algo_options  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def make_batch(rewards, group_size, lengths=None, width=4, answers=None):
    """DataProto with verl's fields: uid per prompt repeated group_size times in a row, the outcome
    reward on the last valid response token."""
    n = len(rewards)
    lengths = lengths or [width] * n
    mask = torch.zeros(n, width)
    scores = torch.zeros(n, width)
    for i, (r, length) in enumerate(zip(rewards, lengths)):
        mask[i, :length] = 1
        scores[i, length - 1] = r
    uids = np.array([f"prompt-{i // group_size}" for i in range(n)], dtype=object)
    non_tensors = {"uid": uids}
    if answers is not None:
        non_tensors["pred"] = np.array(answers, dtype=object)
    return DataProto.from_dict(
        tensors={"token_level_rewards": scores, "token_level_scores": scores.clone(), "response_mask": mask},
        non_tensors=non_tensors,
    )


def algo(name, **grouprl):
    return OmegaConf.create({"adv_estimator": name, "norm_adv_by_std_in_grpo": True, "grouprl": grouprl})


def advantages_of(batch, name, **grouprl):
    out = compute_advantage(batch, adv_estimator=name, config=algo(name, **grouprl))
    return out.batch["advantages"]


def per_sample(adv, batch):
    """The constant advantage of each row over its valid tokens (and check it is 0 on padding)."""
    mask = batch.batch["response_mask"]
    assert torch.all(adv[mask == 0] == 0)
    return (adv * mask).sum(-1) / mask.sum(-1)


def actor_config(loss_mode, **kwargs):
    policy_loss = kwargs.pop("policy_loss", None) or PolicyLossConfig(loss_mode=loss_mode)
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss, **kwargs)


def call_loss(name, *, log_prob, advantages, mask, old_log_prob=None, agg="token-mean", config=None):
    """Exactly how ``ppo_loss`` (verl 0.9.1) calls a registered loss: all keyword arguments, bool mask."""
    return get_policy_loss_fn(name)(
        old_log_prob=torch.zeros_like(log_prob) if old_log_prob is None else old_log_prob,
        log_prob=log_prob, advantages=advantages, response_mask=mask.to(bool), loss_agg_mode=agg,
        config=config or actor_config(name), rollout_is_weights=None,
    )


# ----------------------------------------------------------------------------- registry
def test_names_are_registered_and_upstream_names_untouched():
    from verl.trainer.ppo.core_algos import compute_gpg_outcome_advantage, compute_policy_loss_gpg

    for name in ("grouprl_gpg", "grouprl_gcpo", "grouprl_copo", "grouprl_guidance"):
        assert name in ADV_ESTIMATOR_REGISTRY
    for name in ("grouprl_pg", "grouprl_copo", "grouprl_guidance"):
        assert name in POLICY_LOSS_REGISTRY
    assert ADV_ESTIMATOR_REGISTRY["gpg"] is compute_gpg_outcome_advantage
    assert POLICY_LOSS_REGISTRY["gpg"] is compute_policy_loss_gpg


# ----------------------------------------------------------------------------- GPG
def test_gpg_differs_from_verl_builtin_gpg_where_alpha_differs():
    # group A [1,0,0,1] is valid, group B [1,1,1,1] is zero-variance.
    # paper: alpha = B/(B-M) = 8/4 = 2 -> A = 2*(r - 0.5) = [1,-1,-1,1], group B 0
    # verl's gpg: alpha = B/count_nonzero = 8/6 -> A = (4/3)*(r - 0.5)
    batch = make_batch([1, 0, 0, 1, 1, 1, 1, 1], group_size=4, lengths=[4, 2, 3, 1, 4, 4, 2, 3])
    ours = per_sample(advantages_of(batch, "grouprl_gpg"), batch)
    assert ours.tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0])
    same = make_batch([1, 0, 0, 1, 1, 1, 1, 1], group_size=4, lengths=[4, 2, 3, 1, 4, 4, 2, 3])
    builtin = per_sample(advantages_of(same, "gpg"), same)
    assert builtin.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    assert not torch.allclose(ours, builtin)
    assert estimators.LAST_METRICS == pytest.approx({"gpg/alpha": 2.0, "gpg/valid_fraction": 0.5, "gpg/skipped_step": 0.0})


def test_gpg_equals_verl_builtin_gpg_where_alphas_agree():
    # every sample of the valid group has a non-zero reward and the zero-variance group is all 0:
    # count_nonzero = 4 = B - M, so both alphas are 8/4 = 2. mean_A = 0.75 -> A = 2*(r - 0.75)
    rewards = [1, 0.5, 1, 0.5, 0, 0, 0, 0]
    ours = per_sample(advantages_of(make_batch(rewards, 4), "grouprl_gpg"), make_batch(rewards, 4))
    builtin = per_sample(advantages_of(make_batch(rewards, 4), "gpg"), make_batch(rewards, 4))
    assert ours.tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])
    assert torch.allclose(ours, builtin)


def test_gpg_options_group_norm_no_age_and_skip():
    rewards = [1, 0.5, 1, 0.5, 0, 0, 0, 0]
    std = math.sqrt(4 * 0.25**2 / 3)  # unbiased std of [1, .5, 1, .5]
    adv = per_sample(advantages_of(make_batch(rewards, 4), "grouprl_gpg", gpg={"f_norm": "group"}), make_batch(rewards, 4))
    assert adv[:4].tolist() == pytest.approx([2 * 0.25 / (std + 1e-4), -2 * 0.25 / (std + 1e-4)] * 2, rel=1e-5)
    adv = per_sample(advantages_of(make_batch(rewards, 4), "grouprl_gpg", gpg={"use_age": False}), make_batch(rewards, 4))
    assert adv[:4].tolist() == pytest.approx([0.25, -0.25, 0.25, -0.25])
    adv = advantages_of(make_batch([1, 1, 0, 0], 2), "grouprl_gpg")  # every group zero-variance
    assert torch.all(adv == 0) and estimators.LAST_METRICS["gpg/skipped_step"] == 1.0
    assert "gpg/alpha" not in estimators.LAST_METRICS  # as TRL: no alpha on a skipped step (it logged 0 before)


# ----------------------------------------------------------------------------- GRPO family
def test_gcpo_and_guidance_are_grpo_and_match_verl_grpo():
    # group [1,0,0,0]: mean .25, unbiased std sqrt(.75/3) = .5 -> (r - .25) / (.5 + eps); group [1,1,1,1] -> 0
    rewards = [1, 0, 0, 0, 1, 1, 1, 1]
    batch = make_batch(rewards, 4, lengths=[1, 2, 3, 4] * 2)
    verl_grpo = per_sample(advantages_of(make_batch(rewards, 4), "grpo"), make_batch(rewards, 4))  # verl's eps 1e-6

    def expected(eps):
        return [0.75 / (0.5 + eps)] + [-0.25 / (0.5 + eps)] * 3 + [0.0] * 4

    # GCPO-gold and guidance default to TRL's GRPO eps (1e-4), COPO to the official code's 1e-6
    for name, block, eps in (("grouprl_gcpo", "gcpo", 1e-4), ("grouprl_guidance", "guidance", 1e-4),
                             ("grouprl_copo", "copo", 1e-6)):
        adv = per_sample(advantages_of(batch, name), batch)
        assert adv.tolist() == pytest.approx(expected(eps), rel=1e-6), name
        # with verl's eps they are verl's grpo
        adv = per_sample(advantages_of(batch, name, **{block: {"eps": 1e-6}}), batch)
        assert torch.allclose(adv, verl_grpo, atol=1e-6), name


def test_norm_adv_by_std_false_drops_the_std():
    batch = make_batch([1, 0, 0, 0], 4)
    cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": False})
    out = compute_advantage(batch, adv_estimator="grouprl_gcpo", norm_adv_by_std_in_grpo=False, config=cfg)
    assert per_sample(out.batch["advantages"], batch).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_groups_need_uids():
    batch = make_batch([1, 0], 2)
    batch.non_tensor_batch.pop("uid")
    with pytest.raises(ValueError, match="uid"):
        compute_advantage(batch, adv_estimator="grouprl_gpg", config=algo("grouprl_gpg"))


# ----------------------------------------------------------------------------- losses
def test_grouprl_pg_loss_by_hand_and_equals_verl_gpg_loss():
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = call_loss("grouprl_pg", log_prob=log_prob, advantages=adv, mask=mask)
    assert float(loss.detach()) == pytest.approx((2 + 4 - 0.5) / 3)  # -logp*A over valid tokens / 3 tokens
    loss.backward()
    assert log_prob.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])
    builtin, _ = call_loss("gpg", log_prob=log_prob.detach(), advantages=adv, mask=mask, config=actor_config("gpg"))
    assert float(builtin) == pytest.approx(float(loss.detach()))


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregation_matches_verl_agg_loss_with_global_batch_info(mode):
    torch.manual_seed(0)
    loss_mat, mask = torch.randn(3, 5), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    cfg = actor_config("grouprl_pg")
    info = {"dp_size": 2, "batch_num_tokens": 17, "global_batch_size": 6, "loss_scale_factor": 8}
    cfg.global_batch_info.update(info)
    assert float(losses.aggregate(loss_mat, mask, mode, cfg)) == pytest.approx(float(agg_loss(loss_mat, mask, mode, **info)))


def test_copo_loss_by_hand():
    # rows: ratios [1.5, 0.9, pad] and [0.5, 1.1, 5.0]; A_loc +1 / -1, A_glob -0.5 / +2, local weight .25 / .8
    # clip 0.2, dual clip 3. per token l = w*PPO(rho, A_loc) + (1-w)*PPO(rho, A_glob):
    # row 0: .25*-1.2 + .75*.75 = .2625 ; .25*-.9 + .75*.45 = .1125           -> mean .1875
    # row 1: .8*.8 + .2*-1 = .44 ; .8*1.1 + .2*-2.2 = .44 ; .8*3 + .2*-2.4 = 1.92 -> mean 2.8/3
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    extras = {
        "grouprl_copo_local": torch.tensor([1.0, -1.0]),
        "grouprl_copo_global": torch.tensor([-0.5, 2.0]),
        "grouprl_copo_weight": torch.tensor([0.25, 0.8]),
    }
    adv = extras["grouprl_copo_local"].unsqueeze(-1) * mask
    with losses.loss_extras(extras):
        loss, metrics = call_loss("grouprl_copo", log_prob=ratios.log(), advantages=adv, mask=mask, agg="seq-mean-token-mean")
    assert float(loss) == pytest.approx((0.1875 + 2.8 / 3) / 2, rel=1e-6)
    assert "actor/pg_clipfrac" in metrics
    with pytest.raises(RuntimeError, match="grouprl_verl.main_ppo"):
        call_loss("grouprl_copo", log_prob=ratios.log(), advantages=adv, mask=mask)


def test_guidance_loss_by_hand_with_entropy_penalty():
    # A_it (already token-weighted) and ratios; clip .2/.28, dual clip 3:
    # (1.5, 1.5): max(-2.25, -1.28*1.5) = -1.92 ; (1.0, .5): -.5 ; (.5, -1): max(.5,.8)=.8 ; (5, -2): min(max(10,2.4), 6) = 6
    ratios = torch.tensor([[1.5, 1.0], [0.5, 5.0]])
    adv = torch.tensor([[1.5, 0.5], [-1.0, -2.0]])
    mask = torch.ones(2, 2)
    cfg = actor_config("grouprl_guidance", clip_ratio_high=0.28)
    loss, _ = call_loss("grouprl_guidance", log_prob=ratios.log(), advantages=adv, mask=mask, config=cfg)
    assert float(loss) == pytest.approx((-1.92 - 0.5 + 0.8 + 6) / 4)
    penalised = actor_config(
        "grouprl_guidance", clip_ratio_high=0.28,
        policy_loss=GroupRLPolicyLossConfig(loss_mode="grouprl_guidance", grouprl={"entropy_penalty_coef": 0.1}),
    )
    loss, _ = call_loss("grouprl_guidance", log_prob=ratios.log(), advantages=adv, mask=mask, config=penalised)
    penalty = 0.1 * -(math.log(1.5) + math.log(1.0) + math.log(0.5) + math.log(5.0)) / 4
    assert float(loss) == pytest.approx((-1.92 - 0.5 + 0.8 + 6) / 4 + penalty)


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "algo_name, block, match",
    [
        ("gpg", {"f_norm": "std"}, "algorithm.grouprl.gpg.f_norm"),
        ("gpg", {"valid_threshold": 1.5}, "algorithm.grouprl.gpg.valid_threshold"),
        ("gpg", {"alpha": 2}, r"unknown key\(s\) \['alpha'\]"),
        ("gpg", {"use_age": "yes"}, "algorithm.grouprl.gpg.use_age"),
        ("gcpo", {"trigger": "sometimes"}, "algorithm.grouprl.gcpo.trigger"),
        ("gcpo", {"placement": "append"}, "algorithm.grouprl.gcpo.placement"),
        ("gcpo", {"gold_template": "Answer: {answer}"}, "algorithm.grouprl.gcpo.gold_template"),
        ("copo", {"blend": "hard"}, "algorithm.grouprl.copo.blend"),
        ("copo", {"gate_k": "five"}, "algorithm.grouprl.copo.gate_k"),
        ("guidance", {"rank_x": 1.0}, "algorithm.grouprl.guidance.rank_x"),
        ("guidance", {"filter_low": 0.9, "filter_high": 0.1}, "algorithm.grouprl.guidance"),
        ("guidance", {"negative_prompt_type": "custom"}, "negative_template"),
    ],
)
def test_bad_algorithm_options_name_the_key(algo_name, block, match):
    with pytest.raises(ValueError, match=match):
        algo_options(OmegaConf.create({"grouprl": {algo_name: block}}), algo_name)


def test_bad_option_fails_through_compute_advantage_too():
    with pytest.raises(ValueError, match="algorithm.grouprl.gpg.f_norm"):
        compute_advantage(make_batch([1, 0], 2), adv_estimator="grouprl_gpg", config=algo("grouprl_gpg", gpg={"f_norm": "x"}))


def test_defaults_are_the_papers():
    gpg = algo_options(None, "gpg")
    assert (gpg.f_norm, gpg.use_age, gpg.valid_threshold, gpg.max_resample_rounds) == ("none", True, 0.6, 20)
    copo = algo_options(None, "copo")
    assert (copo.gate_k, copo.gate_b, copo.blend, copo.entropy_reward_coef) == (5.0, 1.0, "only-soft", False)
    guidance = algo_options(None, "guidance")
    assert (guidance.rank_x, guidance.rank_y, guidance.filter_low, guidance.filter_high) == (0.4, 0.8, 0.01, 0.99)
    gcpo = algo_options(None, "gcpo")
    assert (gcpo.trigger, gcpo.placement, gcpo.solution_key) == ("all_wrong", "replace", "solution")


def test_bad_policy_loss_options():
    with pytest.raises(ValueError, match=r"policy_loss.grouprl.*unknown key"):
        GroupRLPolicyLossConfig(loss_mode="grouprl_guidance", grouprl={"entropy_coef": 0.1})
    with pytest.raises(ValueError, match="entropy_penalty_coef"):
        GroupRLPolicyLossConfig(loss_mode="grouprl_guidance", grouprl={"entropy_penalty_coef": float("nan")})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call_loss("grouprl_guidance", log_prob=torch.zeros(1, 1), advantages=torch.ones(1, 1), mask=torch.ones(1, 1),
                  config=actor_config("grouprl_guidance", clip_ratio_c=1.0))


# ----------------------------------------------------------------------------- through verl's own ppo_loss
def ppo_loss_inputs(extras):
    """A 2-row micro-batch as the FSDP engine hands it to the loss: no-padding TensorDict + flat log-probs.

    Same rows as test_copo_loss_by_hand: prompts of 2 tokens, response ratios [1.5, 0.9, pad], [0.5, 1.1, 5.0].
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    prompts = torch.tensor([[7, 8], [7, 9]])
    responses = torch.tensor([[4, 5, 0], [4, 6, 6]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    attention = torch.cat([torch.ones(2, 2, dtype=torch.long), response_mask], 1)
    log_ratio = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 5.0]]).log()
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": response_mask, "old_log_probs": torch.zeros(2, 3),
        "advantages": extras["grouprl_copo_local"].unsqueeze(-1) * response_mask, **extras,
    }
    td = left_right_2_no_padding(DataProto.from_dict(tensors=tensors).to_tensordict())
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=5, global_batch_size=2)
    # flat per-token log-probs of each whole sequence; the one predicting response token k sits at prompt_len - 1 + k
    flat = []
    for i in range(2):
        seq = torch.zeros(int(attention[i].sum()))
        seq[1 : 1 + int(response_mask[i].sum())] = log_ratio[i, : int(response_mask[i].sum())]
        flat.append(seq)
    return {"log_probs": torch.cat(flat)}, td


def test_copo_through_verl_ppo_loss_with_the_grouprl_wrapper():
    from verl.workers.utils.losses import ppo_loss

    extras = {
        "grouprl_copo_local": torch.tensor([1.0, -1.0]),
        "grouprl_copo_global": torch.tensor([-0.5, 2.0]),
        "grouprl_copo_weight": torch.tensor([0.25, 0.8]),
    }
    config = actor_config("grouprl_copo", loss_agg_mode="seq-mean-token-mean")
    model_output, td = ppo_loss_inputs(extras)
    loss, metrics = losses.grouprl_ppo_loss(config, model_output, td)
    assert float(loss) == pytest.approx((0.1875 + 2.8 / 3) / 2, rel=1e-6)  # the hand value of test_copo_loss_by_hand
    model_output, td = ppo_loss_inputs(extras)
    with pytest.raises(RuntimeError, match="grouprl_copo_local"):
        ppo_loss(config, model_output, td)  # verl's own ppo_loss does not pass the fields
