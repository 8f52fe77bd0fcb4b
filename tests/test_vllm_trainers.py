"""vLLM tier: the four grouprl TRL trainers with colocate vLLM rollouts on CPU, driven by TRL's ``train()``.

Each trainer trains a few steps once per module (fixtures below); the tests check what only vLLM
exercises, against numbers computed here by hand: TRL's importance-sampling correction on vLLM's
sampling log-probs, one weight sync per optimizer step however many rounds GPG generates, GCPO-gold
rows next to vLLM rows, and COPO / the guidance negative pass on vLLM rollouts.
"""

from __future__ import annotations

import gc
import math
from collections import Counter

import pytest
import torch

from vllm_tier import (
    HIDDEN,
    RewardLog,
    capture_compute_loss,
    first_char_reward,
    logged,
    low_digit_reward,
    naive_completion_logps,
    naive_is_ratio,
    policy_fingerprint,
    require_vllm,
    vllm_args,
    vllm_weights_equal_policy,
)

pytestmark = pytest.mark.vllm

IS_KEYS = ("sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
           "sampling/importance_sampling_ratio/max")
TOL = dict(rtol=1e-5, atol=2e-6)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    require_vllm()
    from grouprl_trl.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny128", hidden_size=HIDDEN))


def _train(trainer_cls, config_cls, model_dir, out, reward, extra_capture=None, **fields):
    from grouprl_trl.tiny import build_tokenizer, build_toy_dataset

    args = config_cls(**vllm_args(out, **fields))
    trainer = trainer_cls(model=model_dir, reward_funcs=reward, args=args, train_dataset=build_toy_dataset(64),
                          processing_class=build_tokenizer())
    records = capture_compute_loss(trainer, extra_capture)
    vgen = trainer.vllm_generation
    syncs, generations = [], []
    sync_weights, generate = vgen.sync_weights, vgen.generate

    def counted_sync():
        syncs.append(trainer.state.global_step)
        return sync_weights()

    def checked_generate(*args, **kwargs):
        generations.append({"step": trainer.state.global_step, "in_sync": vllm_weights_equal_policy(trainer),
                            "fingerprint": policy_fingerprint(trainer)})
        return generate(*args, **kwargs)

    vgen.sync_weights, vgen.generate = counted_sync, checked_generate
    trainer.train()
    return {"trainer": trainer, "records": records, "syncs": syncs, "generations": generations}


def _release(run):
    run.clear()
    gc.collect()


@pytest.fixture(scope="module")
def gpg_run(tiny_model_dir, tmp_path_factory):
    from grouprl_trl import GPGConfig, GPGTrainer

    # 4 groups, each with a reward signal 4 times in 10: the threshold (all 4 groups) asks for extra rounds
    run = _train(GPGTrainer, GPGConfig, tiny_model_dir, tmp_path_factory.mktemp("gpg"), low_digit_reward,
                 max_steps=3, per_device_train_batch_size=16, valid_threshold=1.0, max_resample_rounds=3,
                 carry_over=False)
    yield run
    _release(run)


def _gcpo(tiny_model_dir, out, placement):
    from grouprl_trl import GCPOConfig, GCPOTrainer
    from grouprl_trl.tiny import toy_reward

    # toy_reward: a random model is almost always wrong, so most groups get their gold answer
    return _train(GCPOTrainer, GCPOConfig, tiny_model_dir, out, toy_reward, gold_template="{solution}",
                  gold_placement=placement)


@pytest.fixture(scope="module")
def gcpo_replace_run(tiny_model_dir, tmp_path_factory):
    run = _gcpo(tiny_model_dir, tmp_path_factory.mktemp("gcpo_replace"), "replace")
    yield run
    _release(run)


@pytest.fixture(scope="module")
def gcpo_append_run(tiny_model_dir, tmp_path_factory):
    run = _gcpo(tiny_model_dir, tmp_path_factory.mktemp("gcpo_append"), "append")
    yield run
    _release(run)


@pytest.fixture(scope="module")
def copo_run(tiny_model_dir, tmp_path_factory):
    from grouprl_trl import COPOConfig, COPOTrainer

    reward = RewardLog(first_char_reward)
    run = _train(COPOTrainer, COPOConfig, tiny_model_dir, tmp_path_factory.mktemp("copo"), reward,
                 answer_extractor="grouprl_trl.tiny.toy_extract_answer")
    run["reward"] = reward
    yield run
    _release(run)


def _negative_pass(model, inputs):
    """Hand-computed log-probs of the completion under the negative context, before the trainer's step."""
    return {"naive_neg_logps": naive_completion_logps(model, inputs["neg_prompt_ids"], inputs["neg_prompt_mask"],
                                                      inputs["completion_ids"], inputs["completion_mask"])}


@pytest.fixture(scope="module")
def guidance_run(tiny_model_dir, tmp_path_factory):
    from grouprl_trl import GuidanceGCPOConfig, GuidanceGCPOTrainer

    run = _train(GuidanceGCPOTrainer, GuidanceGCPOConfig, tiny_model_dir, tmp_path_factory.mktemp("guidance"),
                 first_char_reward, extra_capture=_negative_pass)
    yield run
    _release(run)


def _trained(records):
    """Records of micro-batches that reached the loss (not a skipped step)."""
    return [r for r in records if not bool(r.get("gpg_skip", False)) and not bool(r.get("guidance_skip", False))]


def test_check_vllm_support_accepts_the_installed_vllm(tiny_model_dir):
    from packaging.version import Version
    from trl import GRPOConfig

    from grouprl_trl.vllm_support import accepted_vllm_range, check_vllm_support, installed_vllm_version

    low, high = accepted_vllm_range()
    assert Version(low) <= Version(Version(installed_vllm_version()).base_version) <= Version(high)
    check_vllm_support(GRPOConfig(**vllm_args("unused")))


# ----------------------------------------------------------------------------- all four trainers
@pytest.mark.parametrize("run_name", ["gpg_run", "gcpo_replace_run", "gcpo_append_run", "copo_run", "guidance_run"])
def test_vllm_sampling_logprobs_give_the_importance_ratio(run_name, request):
    """Every step logs TRL's IS-ratio metrics, and the ratio each loss call multiplies in is
    exp(sum_t(log pi_theta - log pi_vLLM)) from the vLLM sampling log-probs (sequence_mask)."""
    run = request.getfixturevalue(run_name)
    trainer = run["trainer"]
    steps = trainer.state.global_step
    assert steps == trainer.args.max_steps
    for key in IS_KEYS:
        values = logged(trainer, key)
        assert len(values) == steps, key
        assert all(0.9 < v < 1.1 for v in values), (key, values)
    records = _trained(run["records"])
    assert records
    largest_gap = 0.0
    for rec in records:
        mask = rec["completion_mask"].bool()
        sampled = rec["sampling_per_token_logps"]
        # vLLM (bfloat16 on CPU) and the float32 policy disagree a little on every sampled row
        gap = (sampled - rec["naive_logps"]).abs()[mask & ~torch.isnan(sampled)]
        assert gap.numel() > 0 and gap.max() < 0.05
        largest_gap = max(largest_gap, gap.max().item())
        # the old log-probs TRL computed after generation are this step's policy (no update in between)
        torch.testing.assert_close(rec["old_per_token_logps"][mask], rec["naive_logps"][mask], **TOL)
        expected = naive_is_ratio(rec["naive_logps"], sampled, mask.float())
        torch.testing.assert_close(rec["importance_sampling_ratio"], expected, rtol=1e-4, atol=1e-6)
    assert largest_gap > 1e-4  # the ratios are not trivially 1


# ----------------------------------------------------------------------------- GPG
def test_gpg_loss_is_recomputed_from_vllm_logprobs(gpg_run):
    """GPG's loss is sum(-log pi * A * rho * mask) / tokens with rho from vLLM: recomputed by hand
    from the hand-computed log-probs and the vLLM sampling log-probs; without rho it differs."""
    records = _trained(gpg_run["records"])
    assert len(records) == gpg_run["trainer"].state.global_step
    moved_by_rho = 0.0
    for rec in records:
        mask = rec["completion_mask"].float()
        rho = naive_is_ratio(rec["naive_logps"], rec["sampling_per_token_logps"], mask)
        adv = rec["advantages"].reshape(-1, 1)
        with_rho = (-rec["naive_logps"] * adv * rho * mask).sum() / mask.sum()
        without_rho = (-rec["naive_logps"] * adv * mask).sum() / mask.sum()
        assert rec["loss"].item() == pytest.approx(with_rho.item(), rel=1e-5, abs=2e-7)
        moved_by_rho = max(moved_by_rho, abs(with_rho.item() - without_rho.item()))
    assert moved_by_rho > 1e-5  # the check above can tell rho from no rho


def test_gpg_syncs_vllm_weights_once_per_step_and_resamples_from_current_weights(gpg_run):
    trainer, generations = gpg_run["trainer"], gpg_run["generations"]
    steps = trainer.state.global_step
    extra_rounds = logged(trainer, "gpg/resample_rounds")
    assert len(extra_rounds) == steps and sum(extra_rounds) >= 2
    # one sync per optimizer step (TRL pushes at the first generation of a step), none per extra round
    assert gpg_run["syncs"] == list(range(steps))
    # one vLLM call for the batch plus one per extra round
    assert len(generations) == steps + int(sum(extra_rounds))
    assert Counter(g["step"] for g in generations) == {s: 1 + int(extra_rounds[s]) for s in range(steps)}
    # every call, extra rounds included, generated with vLLM holding the policy's current weights ...
    assert all(g["in_sync"] for g in generations)
    # ... which moved from step to step (so "in sync" is not vacuous) and not within a step
    per_step = {s: {g["fingerprint"] for g in generations if g["step"] == s} for s in range(steps)}
    assert all(len(v) == 1 for v in per_step.values())
    assert len({v.pop() for v in per_step.values()}) == steps


# ----------------------------------------------------------------------------- GCPO-gold
def _gold_rows(rec, tokenizer):
    """Rows whose completion is the rendered reference ("{solution}" + EOS), found from the prompt text."""
    from grouprl_trl.tiny import toy_answer

    rows = []
    for i in range(rec["completion_ids"].size(0)):
        prompt = tokenizer.decode(rec["prompt_ids"][i][rec["prompt_mask"][i].bool()], skip_special_tokens=True)
        gold = tokenizer(toy_answer(prompt[1:-1]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if rec["completion_ids"][i][rec["completion_mask"][i].bool()].tolist() == gold:
            rows.append(i)
    return rows


@pytest.mark.parametrize("run_name", ["gcpo_replace_run", "gcpo_append_run"])
def test_gcpo_gold_rows_next_to_vllm_rows_get_ratio_one_and_reach_the_loss(run_name, request):
    gcpo_run = request.getfixturevalue(run_name)
    trainer = gcpo_run["trainer"]
    tokenizer = trainer.processing_class
    injected = logged(trainer, "gold/injected_frac")
    records = _trained(gcpo_run["records"])
    assert len(records) == len(injected) == trainer.state.global_step
    num_groups = trainer.args.per_device_train_batch_size // trainer.args.num_generations
    gold_share = 0.0
    for rec, frac in zip(records, injected):
        gold = _gold_rows(rec, tokenizer)
        assert len(gold) == round(frac * num_groups) > 0
        mask = rec["completion_mask"].float()
        rho = rec["importance_sampling_ratio"]
        sampled_rows = [i for i in range(mask.size(0)) if i not in gold]
        assert rho[gold].eq(1.0).all()  # not sampled by vLLM: no correction, not masked
        assert (rho[sampled_rows] != 1.0).any()  # vLLM rows next to them are corrected
        assert (rec["advantages"][gold] > 0).all()  # the gold answer is the one right answer of its group
        # TRL's GSPO loss (loss_type "grpo", sequence ratio) by hand, with the vLLM correction
        log_ratio = ((rec["naive_logps"] - rec["old_per_token_logps"]) * mask).sum(-1) / mask.sum(-1)
        ratio = torch.exp(log_ratio).unsqueeze(-1)
        clipped = ratio.clamp(1 - trainer.args.epsilon, 1 + trainer.args.epsilon_high)
        adv = rec["advantages"].unsqueeze(-1)
        per_row = -torch.minimum(ratio * adv, clipped * adv) * naive_is_ratio(
            rec["naive_logps"], rec["sampling_per_token_logps"], mask)
        assert rec["loss"].item() == pytest.approx(per_row.mean().item(), rel=1e-5, abs=2e-7)
        gold_share = max(gold_share, abs(per_row[gold].sum().item()) / mask.size(0))
    assert gold_share > 1e-3  # the gold rows' term is a visible part of that loss


# ----------------------------------------------------------------------------- COPO
def test_copo_runs_on_vllm_rollouts(copo_run):
    """COPO's consistency entropy is computed on the vLLM completions (recomputed here from the
    completions the reward function saw), its gate/global metrics are logged, the loss is finite."""
    trainer, reward = copo_run["trainer"], copo_run["reward"]
    g = trainer.args.num_generations
    entropy = logged(trainer, "copo/consistency_entropy")
    assert len(reward.calls) == len(entropy) == trainer.state.global_step
    for completions, logged_h in zip(reward.calls, entropy):
        per_group = []
        for k in range(0, len(completions), g):
            counts = Counter(c.lstrip()[:1] for c in completions[k : k + g])
            per_group.append(-sum(n / g * math.log2(n / g) for n in counts.values()))
        assert logged_h == pytest.approx(sum(per_group) / len(per_group), rel=1e-5)
    assert any(h > 0 for h in entropy)
    for key in ("copo/gate_mean", "copo/global_adv_std", "copo/local_weight_mean"):
        values = logged(trainer, key)
        assert len(values) == trainer.state.global_step and all(math.isfinite(v) for v in values), key
    assert all(0.0 < v < 1.0 for v in logged(trainer, "copo/gate_mean"))
    assert all(math.isfinite(r["loss"].item()) for r in copo_run["records"])
    assert len(copo_run["syncs"]) == trainer.state.global_step


# ----------------------------------------------------------------------------- GCPO-guidance
def test_guidance_negative_pass_runs_on_vllm_rollouts(guidance_run):
    """The negative-context pass scores vLLM's completions with the policy: the logged k3
    divergence equals mean(exp(D) - D - 1), D = log pi(y|c-) - log pi(y|c+), computed here by hand."""
    trainer = guidance_run["trainer"]
    tokenizer = trainer.processing_class
    records = _trained(guidance_run["records"])
    divergence = logged(trainer, "guidance/divergence_mean")
    assert records and len(divergence) == len(records) == trainer.state.global_step
    assert all(k > 0 for k in logged(trainer, "guidance/kept_frac"))
    for rec, logged_d in zip(records, divergence):
        mask = rec["completion_mask"].bool()
        delta = rec["naive_neg_logps"] - rec["naive_logps"]
        k3 = torch.exp(delta) - delta - 1
        assert logged_d == pytest.approx(k3[mask].mean().item(), rel=1e-4, abs=1e-7)
        assert logged_d > 0  # the negative context changes the completion's probability
        prompt = tokenizer.decode(rec["prompt_ids"][0][rec["prompt_mask"][0].bool()])
        negative = tokenizer.decode(rec["neg_prompt_ids"][0][rec["neg_prompt_mask"][0].bool()])
        assert negative.startswith(prompt) and len(negative) > len(prompt)
    weight_max = logged(trainer, "guidance/weight_max")
    assert len(weight_max) == len(records) and all(1.0 <= w < 10.0 for w in weight_max)
    # the negative pass is a policy forward, not another vLLM call: one generation per step
    assert [g["step"] for g in guidance_run["generations"]] == list(range(trainer.state.global_step))
