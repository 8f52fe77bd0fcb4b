"""verl 0.9.1's real ``RayPPOTrainer.fit()`` through ``GroupRLRayPPOTrainer`` on CPU, for all four algorithms.

The runs go through grouprl's own task runner (``GroupRLTaskRunner.run``, what ``python -m
grouprl_verl.main_ppo`` runs in its Ray actor) with the GPU parts replaced by the stand-ins of
``tests/verl_fit_standins.py`` (tiny HF model worker, vLLM with level-2 sleep, in-process agent-loop
worker, CPU resource pools). Everything else is verl's code: dataset, agent loop, reward loop and
reward managers (Ray actor), ``_balance_batch``, ``compute_advantage``, registries, ``ppo_loss``,
checkpointing, metrics (``Tracking`` file logger).

Each test recounts a number from what the worker received (``FitRecords``) and compares it with
what grouprl logged or computed. Run alone with ``pytest -m verl_fit``.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
ray = pytest.importorskip("ray")

import verl_fit_rewards as R  # noqa: E402
import verl_fit_standins as S  # noqa: E402
from grouprl_trl.tiny import build_tokenizer, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.verl_fit

TOKENIZER = build_tokenizer()
EOS = TOKENIZER.eos_token_id


@pytest.fixture(scope="module")
def fit_env(tmp_path_factory):
    """One Ray session (for verl's reward-loop workers), the tiny model and the parquet, for every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is latency bound; more threads only contend on a shared CPU
    logging.getLogger("verl.utils.tokenizer.continuous_token_wiring").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("verl_fit")
    env = {
        "model": str(save_tiny_model(root / "tiny")),
        "parquet": S.write_fit_data(str(root)),
        "root": root,
    }
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield env
    if started:
        ray.shutdown()
    torch.set_num_threads(threads)


class _LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def fit(fit_env, name: str, config_name: str, reward: str, steps: int, extra: list[str]) -> S.FitRun:
    work = fit_env["root"] / name
    work.mkdir(exist_ok=True)
    overrides = S.fit_overrides(fit_env["model"], fit_env["parquet"], str(work), reward, steps) + extra
    trainer_logger, records = logging.getLogger("grouprl_verl.trainer"), _LogRecords()
    level = trainer_logger.level
    trainer_logger.setLevel(logging.INFO)
    trainer_logger.addHandler(records)
    try:
        run = S.run_fit(S.compose(config_name, overrides), str(work))
    finally:
        trainer_logger.removeHandler(records)
        trainer_logger.setLevel(level)
    run.log = records.messages
    return run


def expected_skip_log(name: str, skipped: list[bool], first_step: int = 1, every: int = 10) -> list[tuple]:
    """Naive re-derivation of the skipped-step lines: ("first", step), ("run", step, run), then the count."""
    out, total, run = [], 0, 0
    for step, skip in enumerate(skipped, start=first_step):
        if not skip:
            run = 0
            continue
        total, run = total + 1, run + 1
        if total == 1:
            out.append(("first", step))
        elif run % every == 0:
            out.append(("run", step, run))
    return out + [("count", total, len(skipped))]


def skip_log(run: S.FitRun, name: str) -> list[tuple]:
    found = []
    for m in run.log:
        if m.startswith(f"{name} skipped optimizer step "):
            found.append(("first", int(m.split()[4].rstrip(":"))))
        elif " optimizer steps in a row (steps " in m and m.startswith(f"{name} skipped "):
            run_length, last = int(m.split()[2]), int(m.split("(steps ")[1].split(";")[0].split("-")[1])
            found.append(("run", last, run_length))
        elif m.startswith(f"{name} skipped ") and " optimizer steps" in m:
            words = m.split()
            found.append(("count", int(words[2]), int(words[4])))
    return found


def text(ids, mask=None) -> str:
    ids = [int(t) for t, m in zip(ids, mask if mask is not None else [1] * len(ids), strict=True) if m]
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def rewards_of(update) -> torch.Tensor:
    return update["token_level_scores"].sum(-1)


def naive_group_stats(uids, rewards):
    """Per group: its rows and whether its rewards differ (a valid group for GPG)."""
    groups = S.uid_groups(uids)
    valid = {u: len({float(rewards[i]) for i in rows}) > 1 for u, rows in groups.items()}
    return groups, valid


def trained_steps(run: S.FitRun) -> list[int]:
    """The steps whose batch reached update_actor, in order (a skipped step sends nothing)."""
    return [m["step"] for m in run.metrics if m["data"].get("grouprl/skipped_update", 0.0) != 1.0]


# ============================================================================ GPG
GPG_STEPS = 5
GPG_EXTRA = [
    "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "++algorithm.grouprl.gpg.valid_threshold=1.0",  # every group valid, else an extra round (beta_th)
    "++algorithm.grouprl.gpg.max_resample_rounds=1",
    "trainer.save_freq=4",  # the resume test starts from global_step_4
    "data.shuffle=false",  # steps 1-3 draw rows 0-11 in order; extra rounds draw from all rows (own sampler)
    # a colocated reward model: fit scores after generation with _compute_reward_colocate (the RM server is a stand-in)
    "reward.reward_model.enable=true",
]


@pytest.fixture(scope="module")
def gpg_run(fit_env):
    extra = GPG_EXTRA + [f"reward.reward_model.model_path={fit_env['model']}", "reward.reward_model.rollout.name=vllm"]
    return fit(fit_env, "gpg", "grouprl_gpg", "gpg_score", GPG_STEPS, extra)


STEPS = tuple(range(1, GPG_STEPS + 1))


def test_gpg_runs_with_data_seed_unset_extra_rounds_and_carry_over(gpg_run):
    """Defect 1: the first extra round seeded its sampler from data.seed, which verl leaves null."""
    assert gpg_run.trainer.config.data.seed is None
    assert [m["step"] for m in gpg_run.metrics] == list(STEPS)
    metrics = [gpg_run.step_metrics(s) for s in STEPS]
    assert sum(m["gpg/resample_rounds"] for m in metrics) >= 1
    assert any(m["gpg/carried_frac"] > 0 for m in metrics)
    assert any(m["gpg/alpha"] != 1.0 for m in metrics)  # the recount below is not only of all-valid batches


def test_gpg_logged_alpha_and_valid_fraction_equal_a_recount_of_the_trained_batch(gpg_run):
    steps = trained_steps(gpg_run)
    assert len(steps) == len(gpg_run.records.updates) == GPG_STEPS
    for step, update in zip(steps, gpg_run.records.updates, strict=True):
        rewards = rewards_of(update)
        groups, valid = naive_group_stats(update["uid"], rewards)
        batch = len(rewards)
        zero_var_rows = sum(len(rows) for u, rows in groups.items() if not valid[u])
        logged = gpg_run.step_metrics(step)
        assert logged["gpg/valid_fraction"] == pytest.approx(sum(valid.values()) / len(groups))
        assert logged["gpg/alpha"] == pytest.approx(batch / (batch - zero_var_rows))


def extra_round_uids(run: S.FitRun) -> set[str]:
    """uids generated by grouprl's extra rounds (every generate_sequences call of a step after fit's first)."""
    seen_steps, uids = set(), set()
    for steps, call_uids in run.trainer.async_rollout_manager.generations:
        if steps in seen_steps:
            uids.update(call_uids)
        seen_steps.add(steps)
    return uids


def test_gpg_rewards_and_extras_of_every_trained_row_come_from_the_reward_function(gpg_run):
    """Defects 5 (GPG rows copied into fixed-width string arrays) and 7 (extra rounds scored by the colocated RM)."""
    from_extra_rounds = extra_round_uids(gpg_run)
    assert any(u in from_extra_rounds for update in gpg_run.records.updates for u in update["uid"])
    for update in gpg_run.records.updates:
        for i in range(len(update["uid"])):
            response = text(update["responses"][i], update["response_mask"][i])
            info = {"num_turns": 2, "rollout_reward_scores": {}, "index": update["extra_info"][i]["index"]}
            expected = R.gpg_score("grouprl_toy", response, None, info)
            assert float(rewards_of(update)[i]) == expected["score"]
            assert update["pred"][i] == expected["pred"], (update["pred"][i], expected["pred"])


def test_gpg_extra_rounds_generate_from_the_current_weights_after_vllm_sleep(gpg_run):
    """Defect 2: fit sleeps vLLM at level 2 before the hooks run; extra rounds must re-sync the weights."""
    run = gpg_run
    events = run.rollout.events
    extra_rounds = int(sum(run.step_metrics(s)["gpg/resample_rounds"] for s in STEPS))
    assert extra_rounds >= 1
    # every generate() came after an update_weights() that followed the last sleep
    loaded = False
    for kind, _ in events:
        if kind == "sleep":
            loaded = False
        elif kind == "update_weights":
            loaded = True
        elif kind == "generate":
            assert loaded
    # the weights pushed for the extra rounds are the actor's current ones (those of the last sync before them)
    syncs = run.records.weight_syncs
    generations = run.trainer.async_rollout_manager.generations
    assert len(generations) == GPG_STEPS + extra_rounds
    # syncs: global_steps 0 before training, then per step s: one per extra round (s) and one after the update (s)
    resyncs = [i for i in range(1, len(syncs) - 1) if syncs[i][0] == syncs[i + 1][0]]
    assert len(resyncs) == extra_rounds
    for i in resyncs:  # the actor has not stepped since the previous sync: the same weights again
        assert torch.equal(syncs[i][1], syncs[i - 1][1])


def test_gpg_carried_groups_are_trained_next_step_and_counted(gpg_run):
    """Defect 3: carried groups keep their old meta_info and DataProto.concat refused them on the next step."""
    run = gpg_run
    generated_at: dict[str, int] = {}
    for steps, uids in run.trainer.async_rollout_manager.generations:
        for u in uids:
            generated_at.setdefault(u, steps)
    carried_any = False
    for step, update in zip(trained_steps(run), run.records.updates, strict=True):
        groups = S.uid_groups(update["uid"])
        carried = [u for u in groups if generated_at[u] < step]
        logged = run.step_metrics(step)["gpg/carried_frac"]
        assert logged == pytest.approx(len(carried) / len(groups))
        carried_any |= bool(carried)
    assert carried_any


def test_gpg_colocated_reward_model_scored_every_generation_round(gpg_run):
    """Defect 7: fit runs the colocated reward model after its generation; extra rounds must do the same."""
    manager = gpg_run.trainer.reward_loop_manager.reward_model_manager
    generations = gpg_run.trainer.async_rollout_manager.generations
    assert len(generations) > GPG_STEPS  # fit's rounds and grouprl's extra rounds
    assert manager.wake_ups == len(generations)


def test_gpg_resume_restores_carry_buffer_and_resampling_position(gpg_run, fit_env):
    """Defect 10: a run interrupted after step 4 and resumed equals the straight run at step 5."""
    straight = gpg_run
    last = straight.step_metrics(GPG_STEPS)
    # the last step uses groups carried from the step before and an extra round from the resampling sampler
    assert last["gpg/carried_frac"] > 0 and last["gpg/resample_rounds"] > 0
    checkpoint = os.path.join(str(fit_env["root"] / "gpg"), "ckpt", f"global_step_{GPG_STEPS - 1}")
    extra = GPG_EXTRA + [f"reward.reward_model.model_path={fit_env['model']}", "reward.reward_model.rollout.name=vllm",
                         "trainer.save_freq=-1", "trainer.resume_mode=resume_path",
                         f"trainer.resume_from_path={checkpoint}"]
    resumed = fit(fit_env, "gpg_resume", "grouprl_gpg", "gpg_score", GPG_STEPS, extra)
    assert [m["step"] for m in resumed.metrics] == [GPG_STEPS]
    for key in ("gpg/carried_frac", "gpg/resample_rounds", "gpg/alpha", "gpg/valid_fraction"):
        assert resumed.step_metrics(GPG_STEPS)[key] == pytest.approx(last[key]), key

    def rows(update):
        return sorted((text(update["prompts"][i]), text(update["responses"][i], update["response_mask"][i]),
                       float(rewards_of(update)[i])) for i in range(len(update["uid"])))

    (resumed_update,) = resumed.records.updates
    assert rows(resumed_update) == rows(straight.records.updates[-1])
    # the carried groups are the very ones the straight run saved (uids are fresh uuid4s otherwise)
    shared = set(resumed_update["uid"]) & set(straight.records.updates[-1]["uid"])
    assert len(shared) == round(last["gpg/carried_frac"] * 8)
    torch.testing.assert_close(resumed.records.weight_syncs[-1][1], straight.records.weight_syncs[-1][1])


def test_gpg_skipped_steps_are_reported_as_the_metrics_say(gpg_run):
    skipped = [gpg_run.step_metrics(s)["gpg/skipped_step"] == 1.0 for s in STEPS]
    assert skip_log(gpg_run, "GPG") == expected_skip_log("GPG", skipped)  # at least the count line


def test_gpg_batches_without_signal_skip_with_a_warning_in_verl_keys(fit_env):
    # gcpo_score never rewards the tiny random model: every group has equal rewards, every update is skipped
    run = fit(fit_env, "gpg_skip", "grouprl_gpg", "gcpo_score", 2, ["++algorithm.grouprl.gpg.valid_threshold=0"])
    assert [run.step_metrics(s)["gpg/skipped_step"] for s in (1, 2)] == [1.0, 1.0]
    assert run.records.updates == [] and run.records.optimizer_steps == 0
    assert skip_log(run, "GPG") == expected_skip_log("GPG", [True, True])
    n = run.trainer.config.actor_rollout_ref.rollout.n
    first, count = run.log[-2:]
    assert first.startswith("GPG skipped optimizer step 1: no group in the batch has non-equal rewards")
    assert f"raise actor_rollout_ref.rollout.n (now {n})" in first
    assert "algorithm.grouprl.gpg.valid_threshold=0, so no extra generation round was tried" in first
    assert "set algorithm.grouprl.gpg.valid_threshold > 0" in first
    assert count.startswith("GPG skipped 2 of 2 optimizer steps (no group in the batch")


# ============================================================================ GCPO-gold
GOLD_TEMPLATE = "answer:{solution}"  # no space: the tiny tokenizer, reloaded from disk, drops spaces
GOLD_LENGTH = len(GOLD_TEMPLATE.format(solution="42")) + 1  # two-digit answers, one token per character, eos
DAPO = ["reward.reward_manager.name=dapo", "+reward.reward_kwargs.max_resp_len=12",
        "+reward.reward_kwargs.overlong_buffer_cfg.enable=true", "+reward.reward_kwargs.overlong_buffer_cfg.len=4",
        "+reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
        "+reward.reward_kwargs.overlong_buffer_cfg.log=false"]


def dapo_score(correct: float, valid_length: int) -> float:
    """DAPORewardManager (verl 0.9.1): score + min(-(L - (max_resp_len - buffer)) / buffer * factor, 0)."""
    return correct + min(-(valid_length - (12 - 4)) / 4 * 1.0, 0.0)


@pytest.fixture(scope="module")
def gcpo_run(fit_env):
    extra = DAPO + [
        f"++algorithm.grouprl.gcpo.gold_template='{GOLD_TEMPLATE}'",
        # verl's rejection sampling on the rollout/old log-prob mismatch (gold rows have no rollout log-probs)
        "algorithm.rollout_correction.rollout_rs=token_k3", "algorithm.rollout_correction.rollout_rs_threshold=2.0",
    ]
    return fit(fit_env, "gcpo", "grouprl_gcpo", "gcpo_score", 2, extra)


def gold_rows(update) -> list[int]:
    """Rows whose response is a gold completion (read from the tokens, whatever the loss mask says)."""
    return [i for i in range(len(update["uid"])) if text(update["responses"][i]).startswith("answer:")]


def test_gcpo_gold_rows_are_scored_by_the_configured_reward_manager(gcpo_run):
    """Defect 4: gold rows go through the configured reward manager (here DAPO's, with its overlong penalty)."""
    assert len(gcpo_run.records.updates) == 2
    for update in gcpo_run.records.updates:
        groups = S.uid_groups(update["uid"])
        gold = gold_rows(update)
        assert len(gold) == len(groups)  # the random model never answers: every group is all-wrong, one gold each
        gts = update["reward_model"]
        for i in range(len(update["uid"])):
            length = int(update["response_mask"][i].sum())
            response = text(update["responses"][i], update["response_mask"][i])
            correct = float(R.gcpo_pred(response) == gts[i]["ground_truth"])
            assert i not in gold or response == GOLD_TEMPLATE.format(solution=gts[i]["ground_truth"])
            assert float(rewards_of(update)[i]) == pytest.approx(dapo_score(correct, length)), (i, response)
        # a hand-rolled call of the reward function would give the gold rows 1.0, DAPO's manager adds its penalty
        assert [float(rewards_of(update)[i]) for i in gold] == pytest.approx([dapo_score(1.0, GOLD_LENGTH)] * len(gold))
        assert dapo_score(1.0, GOLD_LENGTH) < 1.0


def test_gcpo_gold_rows_carry_the_reward_managers_extras(gcpo_run):
    """Defect 5: a two-digit gold ``pred`` in the agent loop's one-character string array, and ``acc``."""
    for update in gcpo_run.records.updates:
        assert len(gold_rows(update)) == len(S.uid_groups(update["uid"]))
        for i in gold_rows(update):
            assert update["pred"][i] == update["reward_model"][i]["ground_truth"]
            assert len(update["pred"][i]) == 2
            assert bool(update["acc"][i]) is True


def test_gcpo_gold_rows_survive_rollout_rejection_sampling(gcpo_run):
    """Defect 6: gold rows have no rollout log-probs; verl's rollout correction must treat them as on-policy."""
    for update in gcpo_run.records.updates:
        assert len(gold_rows(update)) == len(S.uid_groups(update["uid"]))
        for i in gold_rows(update):
            assert int(update["response_mask"][i].sum()) == GOLD_LENGTH  # "answer:42" + eos: no token rejected
            mask = update["response_mask"][i].bool()
            torch.testing.assert_close(update["rollout_log_probs"][i][mask], update["old_log_probs"][i][mask])


def test_gcpo_advantages_are_grpo_on_the_rewards_after_injection(gcpo_run):
    for update in gcpo_run.records.updates:
        assert len(gold_rows(update)) == len(S.uid_groups(update["uid"]))  # each group has a contrast now
        rewards = rewards_of(update).double()
        for u, rows in S.uid_groups(update["uid"]).items():
            r = rewards[rows]
            expected = (r - r.mean()) / (r.std() + 1e-4)  # GRPO with TRL's eps, the default on both backends
            for j, i in enumerate(rows):
                mask = update["response_mask"][i].bool()
                assert torch.allclose(update["advantages"][i][mask].double(), expected[j].expand(int(mask.sum())),
                                      atol=1e-5)


@pytest.fixture(scope="module")
def gcpo_float_run(fit_env):
    extra = [f"++algorithm.grouprl.gcpo.gold_template='{GOLD_TEMPLATE}'"]
    return fit(fit_env, "gcpo_float", "grouprl_gcpo", "gcpo_float_score", 1, extra)


def test_gcpo_gold_row_of_a_float_reward_gets_its_acc(gcpo_float_run):
    """Defects 4 and 5: through verl's naive reward manager (which adds extra_info num_turns and
    rollout_reward_scores, checked by the reward function), a float reward becomes ``score`` and ``acc``."""
    (update,) = gcpo_float_run.records.updates
    gold = gold_rows(update)
    assert gold
    for i in gold:
        assert float(rewards_of(update)[i]) == 1.0
        assert float(update["acc"][i]) == 1.0


# ============================================================================ COPO
@pytest.fixture(scope="module")
def copo_run(fit_env):
    return fit(fit_env, "copo", "grouprl_copo", "copo_score", 2, [])


def test_copo_fields_reach_the_loss(copo_run):
    """The loss verl's ppo_loss computed (through grouprl_ppo_loss) equals a naive COPO loss on what it was given."""
    records = copo_run.records
    assert len(records.updates) == 2 and records.micro_losses
    config = copo_run.trainer.config.actor_rollout_ref.actor
    low, high, dual = config.clip_ratio, config.clip_ratio, config.clip_ratio_c
    for micro in records.micro_losses:
        f = micro["fields"]
        mask = f["response_mask"].bool()
        ratio = torch.exp(micro["log_probs"] - f["old_log_probs"])
        weight = f["grouprl_copo_weight"].view(-1, 1)

        def ppo(adv):
            adv = adv.view(-1, 1)
            unclipped = -adv * ratio
            clipped = -adv * ratio.clamp(1 - low, 1 + high)
            loss = torch.maximum(unclipped, clipped)
            return torch.where(adv < 0, torch.minimum(loss, -adv * dual), loss)

        token_loss = weight * ppo(f["grouprl_copo_local"]) + (1 - weight) * ppo(f["grouprl_copo_global"])
        seq_loss = [(token_loss[i][mask[i]]).mean() for i in range(len(mask)) if mask[i].any()]
        expected = sum(seq_loss) / micro["global_batch_size"]  # seq-mean-token-mean over the mini-batch
        assert micro["loss"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_copo_fields_equal_a_recount_from_rewards_and_answers(copo_run):
    for update in copo_run.records.updates:
        rewards = rewards_of(update).double()
        groups = S.uid_groups(update["uid"])
        means = {}
        for u, rows in groups.items():
            # a row without an answer ("" pred) is keyed by its reward value, as the TRL trainer keys it
            answers = [update["pred"][i] if str(update["pred"][i]).strip() else ("reward", float(rewards[i]))
                       for i in rows]
            probs = [answers.count(a) / len(answers) for a in set(answers)]
            entropy = -sum(p * math.log2(p) for p in probs)
            gate = 1 / (1 + math.exp(-5.0 * (entropy - 1.0)))
            means[u] = float(rewards[rows].mean())
            for i in rows:
                assert float(update["grouprl_copo_weight"][i]) == pytest.approx(gate, rel=1e-5)
        values = np.array(list(means.values()))
        for u, rows in groups.items():
            expected = (means[u] - values.mean()) / (values.std(ddof=1) + 1e-6)
            for i in rows:
                assert float(update["grouprl_copo_global"][i]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ============================================================================ GCPO-guidance
@pytest.fixture(scope="module")
def guidance_run(fit_env):
    # unshuffled: step 1 trains on rows 0-3, which guidance_score never rewards (no signal: a real skipped step)
    return fit(fit_env, "guidance", "grouprl_guidance", "guidance_score", 2, ["data.shuffle=false"])


def test_guidance_step_without_signal_is_skipped_for_real(guidance_run):
    run = guidance_run
    assert run.step_metrics(1)["grouprl/skipped_update"] == 1.0
    assert len(run.records.updates) == 1 and run.records.optimizer_steps == 1
    syncs = dict(run.records.weight_syncs)  # global_steps -> weights pushed at the end of that step
    assert torch.equal(syncs[0], syncs[1])  # step 1 left the weights alone (no weight decay either)
    assert not torch.equal(syncs[1], syncs[2])  # step 2 moved them
    # the warning (grouprl_core.skips, the rule TRL uses) came out of verl's fit, in verl's keys
    skipped = [run.step_metrics(s)["guidance/skipped_step"] == 1.0 for s in (1, 2)]
    assert skipped == [True, False]
    assert skip_log(run, "GCPO-guidance") == expected_skip_log("GCPO-guidance", skipped)
    first, count = run.log[-2:]
    assert first.startswith("GCPO-guidance skipped optimizer step 1: the dynamic filter dropped every group")
    assert "strictly between 0.01 and 0.99" in first and "algorithm.grouprl.guidance.dynamic_filter=false" in first
    assert "learning-rate schedule does not advance" in first
    assert count.startswith("GCPO-guidance skipped 1 of 2 optimizer steps (the dynamic filter dropped every group")


def test_guidance_negative_pass_runs_with_its_own_token_counts(guidance_run):
    """Defect 8: the negative-context pass is a separate compute_log_prob call with its own sequences and counts."""
    calls = guidance_run.records.log_prob_calls
    assert len(calls) == 3  # step 1: old log-probs (then filtered out); step 2: old log-probs + negative pass
    old, negative = calls[1], calls[2]
    assert old["calculate_entropy"] and not negative["calculate_entropy"]
    assert negative["seq_lens"] != old["seq_lens"]  # another prompt in front of the same responses
    for call in calls:
        assert call["global_token_num"] == call["seq_lens"]


def test_guidance_token_weights_reach_the_update(guidance_run):
    (update,) = guidance_run.records.updates
    rewards = rewards_of(update).double()
    varying = 0
    for u, rows in S.uid_groups(update["uid"]).items():
        r = rewards[rows]
        if r.min() == r.max():  # filtered group: no loss tokens
            assert all(int(update["response_mask"][i].sum()) == 0 for i in rows)
            continue
        expected = (r - r.mean()) / (r.std() + 1e-4)  # GRPO with TRL's eps, the default on both backends
        for j, i in enumerate(rows):
            mask = update["response_mask"][i].bool()
            adv = update["advantages"][i][mask].double()
            assert float(adv.mean()) == pytest.approx(float(expected[j]), rel=1e-4, abs=1e-5)  # weights average 1
            varying += int(adv.max() - adv.min() > 1e-6)
    assert varying > 0
