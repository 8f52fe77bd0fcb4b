"""The DataProto-level hooks of grouprl_verl (what the trainer subclass calls), on hand-made batches."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

import grouprl_verl.register  # noqa: E402,F401
from grouprl_verl import estimators, hooks  # noqa: E402
from grouprl_verl.config import COPOOptions, GCPOOptions, GPGOptions, GuidanceOptions  # noqa: E402

PAD, EOS = 0, 99


def scored_batch(rewards, group_size, width=3, uid_prefix="p", extra=None, meta_info=None):
    n = len(rewards)
    rm = torch.zeros(n, width)
    rm[:, -1] = torch.tensor(rewards, dtype=torch.float32)
    non_tensors = {"uid": np.array([f"{uid_prefix}{i // group_size}" for i in range(n)], dtype=object)}
    non_tensors.update(extra or {})
    return DataProto.from_dict(
        tensors={"rm_scores": rm, "response_mask": torch.ones(n, width), "row": torch.arange(n).unsqueeze(1)},
        non_tensors=non_tensors, meta_info=meta_info,
    )


# ----------------------------------------------------------------------------- COPO
def test_copo_fields_by_hand():
    # group 0: rewards [1,0,0,0], answers 5,3,3,7 -> H = 2*(1/4*2) + 1/2*1 = 1.5 bits
    # group 1: rewards [1,1,0,1], answers 2,2,4,2 -> H = -(.75 log2 .75 + .25 log2 .25) = 0.8113 bits
    # R = [.25, .75]: batch mean .5, unbiased std sqrt(2*.0625/1) -> A_glob = -/+ .25/.35355 = -/+ 0.70711
    answers = np.array(["5", "3", "3", "7", "2", "2", "4", "2"], dtype=object)
    batch = scored_batch([1, 0, 0, 0, 1, 1, 0, 1], 4, extra={"pred": answers})
    metrics = hooks.attach_copo_fields(batch, COPOOptions())
    h1, h2 = 1.5, -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    gate = [1 / (1 + math.exp(-5 * (h - 1))) for h in (h1, h2)]
    assert batch.batch["grouprl_copo_local"].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5], abs=1e-5)
    a = 0.25 / math.sqrt(0.125)
    assert batch.batch["grouprl_copo_global"].tolist() == pytest.approx([-a] * 4 + [a] * 4, abs=1e-5)
    assert batch.batch["grouprl_copo_weight"].tolist() == pytest.approx([gate[0]] * 4 + [gate[1]] * 4, rel=1e-5)
    assert metrics["copo/consistency_entropy"] == pytest.approx((h1 + h2) / 2, rel=1e-5)
    assert metrics["copo/gate_mean"] == pytest.approx(sum(gate) / 2, rel=1e-5)

    zero = scored_batch([1, 0, 0, 0, 1, 1, 0, 1], 4, extra={"pred": answers})
    hooks.attach_copo_fields(zero, COPOOptions(blend="soft-with-zero"))
    assert zero.batch["grouprl_copo_weight"].tolist() == pytest.approx([gate[0], 0, 0, 0, gate[1], gate[1], 0, gate[1]], rel=1e-5)


def test_copo_answers_fallback_and_missing_key():
    # answer_key null: answers are the rewards -> group [1,0,0,0] has H = -(1/4 log2 1/4 + 3/4 log2 3/4)
    batch = scored_batch([1, 0, 0, 0], 4)
    metrics = hooks.attach_copo_fields(batch, COPOOptions(answer_key=None))
    assert metrics["copo/consistency_entropy"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)), rel=1e-5)
    with pytest.raises(KeyError, match="'pred'.*Available"):
        hooks.attach_copo_fields(scored_batch([1, 0], 2), COPOOptions())


def test_copo_rows_without_an_answer_are_keyed_by_their_reward_as_in_trl():
    """A row whose ``pred`` is "", blank or None has no answer: it counts as equal to another answerless row
    exactly when their rewards are equal (grouprl_core.copo.answer_keys, what the TRL trainer does); it is
    not one shared answer "" (nor "None")."""
    preds = np.array(["7", "", None, "7", "  ", "9", "", "9"], dtype=object)
    batch = scored_batch([1, 0, 0, 1, 1, 1, 0, 1], 4, extra={"pred": preds})
    metrics = hooks.attach_copo_fields(batch, COPOOptions())
    # group 0 by hand: 7, (no answer, r=0), (no answer, r=0), 7 -> two keys of 2 -> H = 1 bit
    # group 1: (no answer, r=1), 9, (no answer, r=0), 9 -> counts 1, 2, 1 -> H = 1.5 bits
    h = [1.0, 1.5]
    gate = [1 / (1 + math.exp(-5 * (x - 1))) for x in h]
    assert batch.batch["grouprl_copo_weight"].tolist() == pytest.approx([gate[0]] * 4 + [gate[1]] * 4, rel=1e-5)
    assert metrics["copo/consistency_entropy"] == pytest.approx(sum(h) / 2, rel=1e-6)
    assert metrics["copo/extract_fallback_frac"] == 0.5  # four rows of eight have no answer
    assert metrics["copo/local_weight_mean"] == pytest.approx(sum(gate) / 2, rel=1e-5)  # only-soft: w~ = w_q


def test_verl_logs_the_trl_metric_names():
    """Every metric the verl hooks and estimators log is one of grouprl_core.names (TRL's spelling)."""
    from grouprl_core import names
    from grouprl_verl import estimators

    known = {v for k, v in vars(names).items() if k.isupper()}
    logged = {}
    copo = scored_batch([1, 0, 0, 0, 1, 1, 0, 1], 4, extra={"pred": np.array(list("53372242"), dtype=object)})
    logged.update(hooks.attach_copo_fields(copo, COPOOptions()))
    assert set(logged) - known == set()  # COPO's first: copo/global_std was verl's name for copo/global_adv_std
    gold = gold_batch()
    hooks.object_extras(gold)
    logged.update(hooks.inject_gold(gold, GCPOOptions(), [[11, 12, 13]] * 4, reward_loop(1.0), PAD, EOS)[0])
    guided = scored_batch([0, 1, 1, 1], 2)
    guided.batch["advantages"] = torch.ones(4, 3)
    logged.update(hooks.guidance_filter(guided, GuidanceOptions())[0])
    guided.batch["old_log_probs"] = torch.zeros(4, 3)
    logged.update(hooks.apply_guidance_weights(guided, torch.zeros(4, 3), GuidanceOptions()))
    logged.update(hooks.GPGGroupAssembler(GPGOptions()).assemble(scored_batch([1, 0, 1, 0], 2), lambda: None)[1])
    compute_advantage(scored_batch([1, 0, 1, 1], 2).union(DataProto.from_dict(
        tensors={"token_level_rewards": torch.tensor([[0, 0, 1.0], [0, 0, 0], [0, 0, 1], [0, 0, 1]])})),
        adv_estimator="grouprl_gpg", config=OmegaConf.create({"grouprl": {}}))
    logged.update(estimators.LAST_METRICS)
    assert set(logged) - known == set()
    assert {"copo/global_adv_std", "gold/truncated_frac", "gold/sampled_reward_mean", "copo/local_weight_mean",
            "copo/extract_fallback_frac", "gpg/alpha", "guidance/kept_frac", "gpg/carried_frac"} <= set(logged)
    assert logged["gold/truncated_frac"] == 1.0  # [11, 12, 13] + EOS does not fit a width of 3: cut


# ----------------------------------------------------------------------------- guidance
def test_guidance_filter_masks_extreme_groups_and_skips_when_none_left():
    batch = scored_batch([0, 0, 1, 0, 1, 1], 2)
    batch.batch["advantages"] = torch.ones(6, 3)
    metrics, skip = hooks.guidance_filter(batch, GuidanceOptions())
    assert batch.batch["response_mask"].sum(-1).tolist() == [0, 0, 3, 3, 0, 0]
    assert batch.batch["advantages"].sum(-1).tolist() == [0, 0, 3, 3, 0, 0]
    assert metrics["guidance/kept_frac"] == pytest.approx(1 / 3) and not skip
    batch = scored_batch([1, 1, 0, 0], 2)
    _, skip = hooks.guidance_filter(batch, GuidanceOptions())
    assert skip and batch.batch["response_mask"].sum() == 0
    # accuracy from a reward_extra_info key, None counting as 0: group [1, None] has mean .5 -> kept
    batch = scored_batch([5, 5, 5, 5], 2, extra={"acc": np.array([1.0, None, 1.0, 1.0], dtype=object)})
    metrics, _ = hooks.guidance_filter(batch, GuidanceOptions(accuracy_key="acc"))
    assert batch.batch["response_mask"].sum(-1).tolist() == [3, 3, 0, 0]
    # a reward outside [0, 1] is no accuracy (as the TRL trainer): 5 would drop every group silently
    with pytest.raises(ValueError, match=r"reads the reward score .* outside \[0, 1\].*accuracy_key"):
        hooks.guidance_filter(scored_batch([5, 5, 0, 5], 2), GuidanceOptions())


def test_guidance_weights_by_hand():
    # l+ = 0; l- = [0, -1, ln 2] -> Delta = l- - l+; d = e^D - D - 1 = [0, e^-1, 1 - ln 2]
    # ascending ranks: token0 1, token2 2, token1 3 -> p = [1/3, 1, 2/3]; w = 3 p^a / sum p^a
    batch = scored_batch([1, 0], 2)
    batch.batch["old_log_probs"] = torch.zeros(2, 3)
    batch.batch["advantages"] = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    neg = torch.tensor([[0.0, -1.0, math.log(2.0)], [0.0, 0.0, 0.0]])
    metrics = hooks.apply_guidance_weights(batch, neg, GuidanceOptions())
    a = math.log(0.2) / math.log(0.6) - 1
    p = [1 / 3, 1.0, 2 / 3]
    w = [3 * x**a / sum(y**a for y in p) for x in p]
    assert batch.batch["advantages"][0].tolist() == pytest.approx([2 * x for x in w], rel=1e-5)
    # row 1: all divergences 0, ties broken by position -> p = [1/3, 2/3, 1]
    p1 = [1 / 3, 2 / 3, 1.0]
    w1 = [3 * x**a / sum(y**a for y in p1) for x in p1]
    assert batch.batch["advantages"][1].tolist() == pytest.approx([-x for x in w1], rel=1e-5)
    assert metrics["guidance/weight_max"] == pytest.approx(max(w + w1), rel=1e-5)
    assert metrics["guidance/divergence_mean"] == pytest.approx((math.exp(-1) + 1 - math.log(2)) / 6, rel=1e-5)


def test_negative_context_batch_layout():
    batch = DataProto.from_dict(tensors={
        "responses": torch.tensor([[4, 5, PAD], [6, PAD, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 0]]),
        "response_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
    }, meta_info={"temperature": 0.7, "global_token_num": [4, 2]})
    neg = hooks.negative_context_batch(batch, [[7, 8, 9], [3]], PAD)
    assert neg.batch["input_ids"].tolist() == [[7, 8, 9, 4, 5, PAD], [PAD, PAD, 3, 6, PAD, PAD]]
    assert neg.batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]]
    assert neg.batch["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4]
    assert neg.batch["position_ids"][1, 2:4].tolist() == [0, 1]
    assert neg.meta_info["temperature"] == 0.7
    assert neg.meta_info["global_token_num"] == [5, 2]  # its own token counts, not the positive batch's [4, 2]
    assert batch.meta_info["global_token_num"] == [4, 2]


# ----------------------------------------------------------------------------- GCPO-gold
def gold_batch():
    # 2 groups of 2, prompts of width 2 (left-padded), responses of width 3
    prompts = torch.tensor([[PAD, 21], [PAD, 21], [22, 23], [22, 23]])
    responses = torch.tensor([[4, 5, PAD], [6, PAD, PAD], [4, 4, 4], [5, PAD, PAD]])
    response_mask = (responses != PAD).long()
    attention = torch.cat([(prompts != PAD).long(), response_mask], dim=1)
    rm = torch.zeros(4, 3)
    rm[2, 2] = 1.0  # group 1 has a correct rollout; group 0 is all wrong
    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "response_mask": response_mask,
                 "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention,
                 "position_ids": (attention.cumsum(-1) - 1).clamp(min=0), "rm_scores": rm},
        non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object),
                     "data_source": np.array(["toy"] * 4, dtype=object),
                     "pred": np.array(["1", "2", "3", "4"]),  # fixed width <U1, as verl's agent loop builds it
                     "acc": np.array([False, False, True, False], dtype=object)},
        meta_info={"reward_extra_keys": ["pred", "acc"]},
    )


def reward_loop(score, pred="42", calls=None):
    """What verl's reward loop (RewardLoopManager.compute_rm_score) returns for the rows it is given."""

    def score_rows(rows: DataProto) -> DataProto:
        if calls is not None:
            calls.append(rows)
        n = len(rows)
        rm = torch.zeros(n, rows.batch["responses"].size(1))
        rm[torch.arange(n), rows.batch["response_mask"].sum(-1) - 1] = score
        return DataProto.from_dict(tensors={"rm_scores": rm},
                                   non_tensors={"pred": np.array([pred] * n), "acc": np.array([score == 1.0] * n)},
                                   meta_info={"reward_extra_keys": ["pred", "acc"]})

    return score_rows


def test_inject_gold_replaces_the_last_rollout_of_all_wrong_groups_and_rescores():
    batch = gold_batch()
    hooks.object_extras(batch)  # what the trainer does in _balance_batch, before fit takes the extras
    calls = []
    # the rendered reference's ids [11] get EOS, as a sampled response that stopped (fit_gold_completion)
    metrics, rows = hooks.inject_gold(batch, GCPOOptions(), [[11]] * 2 + [[13]] * 2, reward_loop(1.0, calls=calls),
                                      PAD, EOS)
    (scored,) = calls  # scored once, after the rewrite, with the prompt's fields and verl's single-turn num_turns
    assert rows == [1] and scored.batch["responses"].tolist() == [[11, EOS, PAD]]
    assert scored.non_tensor_batch["data_source"].tolist() == ["toy"]
    assert scored.non_tensor_batch["__num_turns__"].tolist() == [2] and "pred" not in scored.non_tensor_batch
    b = batch.batch
    assert b["responses"][1].tolist() == [11, EOS, PAD] and b["response_mask"][1].tolist() == [1, 1, 0]
    assert b["input_ids"][1].tolist() == [PAD, 21, 11, EOS, PAD]
    assert b["attention_mask"][1].tolist() == [0, 1, 1, 1, 0]
    assert b["position_ids"][1, 1:4].tolist() == [0, 1, 2]
    assert b["rm_scores"][1].tolist() == [0.0, 1.0, 0.0]  # on the last valid token
    assert batch.non_tensor_batch["acc"].tolist() == [False, True, True, False]
    assert batch.non_tensor_batch["pred"].tolist() == ["1", "42", "3", "4"]  # not cut to the rollouts' width
    assert b["responses"][0].tolist() == [4, 5, PAD] and b["responses"][3].tolist() == [5, PAD, PAD]
    # the TRL trainer's names: sampled mean 1/4 (one correct rollout of four), gold mean 1, none cut
    assert metrics == {"gold/injected_frac": 0.5, "gold/sampled_reward_mean": 0.25, "gold/reward_mean": 1.0,
                       "gold/truncated_frac": 0.0, "gold/below_threshold_frac": 0.0}
    # the GCPO estimator now sees a contrast in group a: rewards [0, 1] -> -/+ 0.5 / (std 0.7071 + 1e-4, TRL's eps)
    batch.batch["token_level_rewards"] = b["rm_scores"]
    out = compute_advantage(batch, adv_estimator="grouprl_gcpo", config=OmegaConf.create({"grouprl": {}}))
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert out.batch["advantages"][:2, 0].tolist() == pytest.approx([-a, a], rel=1e-6)


def test_inject_gold_refuses_to_cut_an_extra_in_a_fixed_width_array():
    batch = gold_batch()  # without object_extras: verl's <U1 array cannot hold the gold row's "42"
    with pytest.raises(ValueError, match="cannot hold .*42.*balance_batch"):
        hooks.inject_gold(batch, GCPOOptions(), [[11, 12]] * 4, reward_loop(1.0), PAD, EOS)


def test_inject_gold_without_gold_truncation_and_never(monkeypatch):
    batch = gold_batch()
    metrics, rows = hooks.inject_gold(batch, GCPOOptions(), [None, None, [1], [1]], reward_loop(1.0), PAD, EOS)
    assert metrics["gold/injected_frac"] == 0.0 and rows == [] and batch.batch["responses"][1].tolist() == [6, PAD, PAD]
    assert "gold/reward_mean" not in metrics and "gold/truncated_frac" not in metrics  # as TRL: only with a gold row
    batch = gold_batch()
    hooks.object_extras(batch)
    monkeypatch.setattr(hooks, "_WARNED", set())  # the warning is shown once per process
    with pytest.warns(UserWarning, match="1 of 1 injected gold completions scored below.*cut at the response length 3"):
        metrics, _ = hooks.inject_gold(batch, GCPOOptions(), [[1, 2, 3, 4, 5]] * 4, reward_loop(0.0), PAD, EOS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not repeated
        again = gold_batch()
        hooks.object_extras(again)
        hooks.inject_gold(again, GCPOOptions(), [[1, 2, 3, 4, 5]] * 4, reward_loop(0.0), PAD, EOS)
    assert metrics["gold/below_threshold_frac"] == 1.0  # scored 0 < correct_threshold 1
    assert metrics["gold/truncated_frac"] == 1.0 and batch.batch["responses"][1].tolist() == [1, 2, 3]  # cut, no EOS
    assert batch.batch["rm_scores"][1].tolist() == [0.0, 0.0, 0.0]  # scored 0 (not assumed correct)
    batch = gold_batch()
    assert hooks.inject_gold(batch, GCPOOptions(trigger="never"), [[1]] * 4, reward_loop(1.0), PAD, EOS)[0] == {
        "gold/injected_frac": 0.0}


# ----------------------------------------------------------------------------- GPG threshold
def rows_of(batch):
    return [(u, int(r)) for u, r in zip(batch.non_tensor_batch["uid"], batch.batch["row"].flatten())]


def test_gpg_assembler_regenerates_until_threshold_and_fills_with_last_round():
    # 4 groups of 2; round 1: only group p0 valid (25% < 60%); round 2: q0, q1 valid -> 3/4 >= 60%
    first = scored_batch([1, 0, 0, 0, 1, 1, 0, 0], 2, uid_prefix="p")
    second = scored_batch([0, 1, 1, 0, 0, 0, 1, 1], 2, uid_prefix="q")
    asm = hooks.GPGGroupAssembler(GPGOptions())
    out, metrics = asm.assemble(first, iter([second]).__next__)
    assert [u for u, _ in rows_of(out)] == ["p0", "p0", "q0", "q0", "q1", "q1", "q2", "q2"]
    assert metrics == {"gpg/resample_rounds": 1.0, "gpg/extra_prompts": 4.0, "gpg/carried_frac": 0.0}
    assert asm.carry is None


def test_gpg_assembler_carries_leftovers_to_the_next_step_and_respects_the_bound():
    first = scored_batch([1, 0, 0, 0, 0, 0, 0, 0], 2, uid_prefix="p")
    second = scored_batch([0, 1, 1, 0, 0, 1, 1, 0], 2, uid_prefix="q")  # all 4 valid
    asm = hooks.GPGGroupAssembler(GPGOptions())
    out, _ = asm.assemble(first, iter([second]).__next__)
    assert [u for u, _ in rows_of(out)][::2] == ["p0", "q0", "q1", "q2"]
    assert sorted(set(asm.carry.non_tensor_batch["uid"])) == ["q3"]
    # next step: the carried group comes first, this step's valid groups follow
    nxt = scored_batch([1, 0, 0, 1, 1, 0, 0, 1], 2, uid_prefix="r")
    out, metrics = asm.assemble(nxt, lambda: pytest.fail("threshold already reached"))
    assert [u for u, _ in rows_of(out)][::2] == ["q3", "r0", "r1", "r2"]
    assert metrics["gpg/carried_frac"] == 0.25 and sorted(set(asm.carry.non_tensor_batch["uid"])) == ["r3"]
    # bound: nothing valid anywhere -> stops after max_resample_rounds, fills with the last round
    asm = hooks.GPGGroupAssembler(GPGOptions(max_resample_rounds=2, carry_over=False))
    rounds = iter([scored_batch([0] * 8, 2, uid_prefix=p) for p in ("s", "t")])
    out, metrics = asm.assemble(scored_batch([0] * 8, 2), rounds.__next__)
    assert metrics["gpg/resample_rounds"] == 2.0 and set(out.non_tensor_batch["uid"]) == {"t0", "t1", "t2", "t3"}


def test_gpg_assembler_carries_groups_of_an_earlier_fit_batch_with_its_meta_info():
    """Defect 3: a carried group keeps the meta_info of the fit batch it came from (select_idxs shares it);
    DataProto.concat then refused it next to the next step's batch (another global_token_num)."""

    def fit_batch(rewards, prefix, step):  # fit sets global_token_num on its batch before the hook runs
        return scored_batch(rewards, 2, uid_prefix=prefix, meta_info={"global_token_num": [step] * len(rewards)})

    asm = hooks.GPGGroupAssembler(GPGOptions(valid_threshold=0.75))
    # step 1: one valid group; the extra round brings four, one more than fits -> carried
    asm.assemble(fit_batch([1, 0, 0, 0, 0, 0, 0, 0], "a", 1), iter([scored_batch([1, 0] * 4, 2, uid_prefix="x")]).__next__)
    # step 2: carried x3 plus four valid groups of this fit batch -> b3 is carried, with step 2's meta_info
    asm.assemble(fit_batch([1, 0] * 4, "b", 2), lambda: pytest.fail("threshold already reached"))
    assert sorted(set(asm.carry.non_tensor_batch["uid"])) == ["b3"]
    out, metrics = asm.assemble(fit_batch([1, 0] * 4, "c", 3), lambda: pytest.fail("threshold already reached"))
    assert [u for u, _ in rows_of(out)][::2] == ["b3", "c0", "c1", "c2"] and metrics["gpg/carried_frac"] == 0.25


def test_replace_in_place_writes_into_the_existing_storage():
    target = scored_batch([0, 0, 1, 1], 2)
    rm_ref, uid_ref = target.batch["rm_scores"], target.non_tensor_batch["uid"]
    source = scored_batch([1, 0, 0, 1], 2, uid_prefix="z")
    hooks.replace_in_place(target, source)
    assert rm_ref[:, -1].tolist() == [1, 0, 0, 1] and uid_ref.tolist() == ["z0", "z0", "z1", "z1"]


@pytest.mark.parametrize("round_rewards, bound", [
    # V after each round: 1, 2, 5 -> the official loop stops after round 3 (5/4 >= 0.6), alpha 1/min(1, 5/4) = 1
    ([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0, 0]], 20),
    # the bound stops the loop at V = 2 of N = 4: alpha 1/min(1, 2/4) = 2
    ([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 0, 1, 0]], 1),
])
def test_verl_gpg_threshold_and_alpha_equal_the_official_global_count(round_rewards, bound):
    """verl's driver sees the whole batch, so its capped count is the official global one (README Fidelity):
    the rounds run and the estimator's alpha on the assembled batch are the official loop's, re-derived here."""
    threshold, n_groups = 0.6, 4
    v, used = 0, 0  # naive official loop (GT7 554, 600, 625): running count of valid groups over the rounds
    for used, rewards in enumerate(round_rewards[: bound + 1], start=1):
        v += sum(rewards[2 * k] != rewards[2 * k + 1] for k in range(n_groups))
        if v / n_groups >= threshold:
            break
    official_alpha = 1 / min(1, v / n_groups)

    batches = [scored_batch(r, 2, uid_prefix=p) for r, p in zip(round_rewards, "pqr")]
    extra = iter(batches[1:])
    asm = hooks.GPGGroupAssembler(GPGOptions(valid_threshold=threshold, max_resample_rounds=bound, carry_over=False))
    out, metrics = asm.assemble(batches[0], extra.__next__)
    assert metrics["gpg/resample_rounds"] == used - 1
    out.batch["token_level_rewards"] = out.batch["rm_scores"]
    compute_advantage(out, adv_estimator="grouprl_gpg",
                      config=OmegaConf.create({"adv_estimator": "grouprl_gpg", "grouprl": {}}))
    assert estimators.LAST_METRICS["gpg/alpha"] == pytest.approx(official_alpha)
