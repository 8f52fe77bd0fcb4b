"""TRL and verl adapters give the same advantages and losses on the same batch, for every algorithm.

One shared fixture: 2 prompts x 4 completions, completion width 4 with ragged lengths, rewards with
one valid and one all-correct group. TRL sees it in its layout (groups contiguous); verl sees it as
a DataProto in a *shuffled* row order (as after ``_balance_batch``) with uuid-like uids and the
reward on the last response token.

* GPG and GCPO-guidance (step level): the TRL side is the trainers' own methods
  (``GPGTrainer._set_gpg_advantages`` and ``compute_loss``; ``GuidanceGCPOTrainer._dynamic_filter``,
  ``_old_policy_weights``, ``_negative_logps``, ``compute_loss``) on the tiny model; the verl side is
  ``compute_advantage``, the hooks and the registered loss fed with the same model's log-probs. Losses
  and their gradients on the model's parameters must agree.
* GCPO-gold and COPO: the TRL side is the trainers' own generation batch
  (``_generate_and_score_completions`` on the tiny model, with the gold injection resp. COPO's
  advantages, gate and blend weights) and TRL's / COPO's ``compute_loss``; the verl side is
  ``compute_advantage`` with the registered estimator (+ ``attach_copo_fields`` on the reward's raw
  ``pred``, answerless rows included) and verl's ``gspo`` / the registered ``grouprl_copo`` loss on the
  same rows, in verl's shuffled order; the COPO metrics must agree by name and value.
* Through both trainers, with the hooks (the last section): GPG's batch assembly over several
  generation rounds (TRL's ``GPGTrainer`` vs ``GroupRLRayPPOTrainer`` through ``_balance_batch`` and
  ``before_old_log_prob``), gold injection on the same sampled rollouts (TRL's ``GCPOTrainer`` vs
  ``before_old_log_prob``), guidance's filter, negative pass and token weights (TRL's generation batch
  vs ``_update_actor``): the same rows, advantages, metrics and losses.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("trl")

from conftest import tiny_trainer_kwargs  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

import grouprl_verl.register  # noqa: E402,F401
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_extract_answer  # noqa: E402
from grouprl_core import names  # noqa: E402
from grouprl_verl import estimators, hooks, losses  # noqa: E402
from grouprl_verl.config import COPOOptions, GuidanceOptions  # noqa: E402

G, T = 4, 4
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
LENGTHS = [4, 2, 3, 1, 4, 3, 2, 4]
ANSWERS = ["7", "3", "3", "7", "9", "9", "9", "9"]
PERM = torch.tensor([5, 0, 7, 2, 4, 1, 6, 3])  # verl's row order: verl row j holds TRL row PERM[j]
UNPERM = torch.argsort(PERM)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def trl_batch(tok):
    """TRL-layout tensors: prompts of equal width (no left padding), ragged right-padded completions."""
    gen = torch.Generator().manual_seed(0)
    vocab = [i for i in range(len(tok)) if i not in (tok.pad_token_id, tok.eos_token_id)]
    prompt = torch.tensor([vocab[3], vocab[5], vocab[7]])
    prompt_ids = torch.stack([prompt if i < G else prompt.flip(0) for i in range(2 * G)])
    completion_ids = torch.tensor(vocab)[torch.randint(len(vocab), (2 * G, T), generator=gen)]
    completion_mask = torch.zeros(2 * G, T, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        completion_mask[i, :length] = 1
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tok.pad_token_id)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum().float(),
    }


def verl_batch(batch, old_log_probs=None, answers=None, rewards=REWARDS):
    """The same rows as a verl DataProto, shuffled by PERM (inputs in TRL order); the outcome reward
    sits on each response's last valid token."""
    mask = batch["completion_mask"].float()
    scores = torch.zeros_like(mask)
    for i, length in enumerate(batch["completion_mask"].sum(1).tolist()):
        scores[i, length - 1] = rewards[i]
    prompts, responses = batch["prompt_ids"], batch["completion_ids"]
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    tensors = {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": mask, "token_level_rewards": scores, "token_level_scores": scores.clone(),
    }
    if old_log_probs is not None:
        tensors["old_log_probs"] = old_log_probs
    non_tensors = {"uid": np.array([f"uid-{'ab'[i // G]}-{i // G * 977}" for i in range(2 * G)], dtype=object)}
    if answers is not None:
        non_tensors["pred"] = np.array(answers, dtype=object)
    data = DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)
    return data.select_idxs(PERM.numpy())


def advantages(data, name, **grouprl):
    cfg = OmegaConf.create({"adv_estimator": name, "norm_adv_by_std_in_grpo": True, "grouprl": grouprl})
    return compute_advantage(data, adv_estimator=name, config=cfg).batch["advantages"]


def actor_config(loss_mode, **kwargs):
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **kwargs)


def verl_loss(name, data, log_prob, agg, config):
    return get_policy_loss_fn(name)(
        old_log_prob=data.batch["old_log_probs"] if "old_log_probs" in data.batch.keys() else log_prob.detach(),
        log_prob=log_prob, advantages=data.batch["advantages"], response_mask=data.batch["response_mask"].bool(),
        loss_agg_mode=agg, config=config, rollout_is_weights=None,
    )[0]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def policy_logps(trainer, model, batch):
    return trainer._get_per_token_logps_and_entropies(
        model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), T,
    )[0]


# ----------------------------------------------------------------------------- GPG
def test_gpg_trainer_and_verl_agree(tmp_path, tok):
    from grouprl_trl import GPGConfig, GPGTrainer

    model = build_tiny_model(tok, seed=0)
    trainer = GPGTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                         args=GPGConfig(**tiny_trainer_kwargs(tmp_path, valid_threshold=0.0)),
                         train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    model.eval()
    batch = trl_batch(tok)
    batch["gpg_rewards"] = REWARDS.clone()
    trainer._set_gpg_advantages(batch, mode="train")  # the trainer's own advantage step
    data = verl_batch(batch)
    verl_adv = advantages(data, "grouprl_gpg")
    # alpha = 8 / 4 = 2: A = 2 * (r - 0.5) in group a, 0 in the all-correct group b
    assert batch["advantages"].tolist() == pytest.approx([1, -1, -1, 1, 0, 0, 0, 0])
    torch.testing.assert_close(verl_adv[UNPERM], batch["advantages"].unsqueeze(-1) * batch["completion_mask"])

    trl_loss = trainer.compute_loss(model, batch)
    logp = policy_logps(trainer, model, batch)[PERM]
    ours = verl_loss("grouprl_pg", data, logp, "token-mean", actor_config("grouprl_pg"))
    torch.testing.assert_close(ours, trl_loss)
    assert_same_grads(grads(model, trl_loss), grads(model, verl_loss(
        "grouprl_pg", data, policy_logps(trainer, model, batch)[PERM], "token-mean", actor_config("grouprl_pg"))))


# ----------------------------------------------------------------------------- GCPO-guidance
def naive_response_logps(model, neg: DataProto) -> torch.Tensor:
    """Log-probs of ``responses`` given the rows of a verl-layout batch (a second, naive implementation)."""
    with torch.no_grad():
        logits = model(input_ids=neg.batch["input_ids"], attention_mask=neg.batch["attention_mask"],
                       position_ids=neg.batch["position_ids"]).logits
    width = neg.batch["responses"].size(1)
    logits = logits[:, -width - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, neg.batch["responses"].unsqueeze(-1)).squeeze(-1)


def test_guidance_trainer_and_verl_agree(tmp_path, tok):
    from grouprl_trl.guidance import GuidanceGCPOConfig, GuidanceGCPOTrainer

    model = build_tiny_model(tok, seed=1)
    args = GuidanceGCPOConfig(**tiny_trainer_kwargs(tmp_path, max_completion_length=T), weights_from="old_policy")
    trainer = GuidanceGCPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                  args=args, train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    model.eval()
    batch = trl_batch(tok)
    neg_prompt = torch.cat([batch["prompt_ids"], torch.tensor([[5, 6, 7]] * (2 * G))], dim=1)  # c- = prompt + note
    batch["neg_prompt_ids"], batch["neg_prompt_mask"] = neg_prompt, torch.ones_like(neg_prompt)
    # TRL 1.16's GRPO advantage, written out: (r - mean_g) / (std_g + 1e-4), unbiased std
    grouped = REWARDS.view(-1, G)
    batch["advantages"] = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    with torch.no_grad():
        old = policy_logps(trainer, model, batch) + 0.3 * torch.randn(2 * G, T, generator=torch.Generator().manual_seed(1))
    batch["old_per_token_logps"] = old

    filtered = trainer._dynamic_filter(dict(batch), REWARDS.clone())  # group b (all correct) leaves
    assert filtered["completion_ids"].size(0) == G
    trainer._old_policy_weights(filtered, "eval")
    trl_loss = trainer.compute_loss(model, filtered)

    data = verl_batch(batch, old_log_probs=old)
    data.batch["advantages"] = advantages(data, "grouprl_guidance")  # default eps: TRL's 1e-4
    metrics, skip = hooks.guidance_filter(data, GuidanceOptions())
    assert not skip and metrics["guidance/kept_frac"] == 0.5
    neg_rows = hooks.negative_context_batch(data, [row.tolist() for row in neg_prompt[PERM]], tok.pad_token_id)
    neg_logp = naive_response_logps(model, neg_rows)
    kept = PERM < G  # verl rows that hold group a
    valid = data.batch["response_mask"][kept].bool()
    torch.testing.assert_close(
        neg_logp[kept][valid], trainer._negative_logps(model, filtered)[PERM[kept]][valid], rtol=1e-5, atol=1e-5
    )
    hooks.apply_guidance_weights(data, neg_logp, GuidanceOptions())
    torch.testing.assert_close(
        data.batch["advantages"][kept],
        (filtered["advantages"].unsqueeze(-1) * filtered["guidance_weights"] * filtered["completion_mask"])[PERM[kept]],
    )
    config = actor_config("grouprl_guidance", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    ours = verl_loss("grouprl_guidance", data, policy_logps(trainer, model, batch)[PERM], "token-mean", config)
    torch.testing.assert_close(ours, trl_loss)
    assert_same_grads(
        grads(model, trainer.compute_loss(model, filtered)),
        grads(model, verl_loss("grouprl_guidance", data, policy_logps(trainer, model, batch)[PERM], "token-mean", config)),
    )


# ----------------------------------------------------------------------------- GCPO-gold
GOLD_ROWS = [{"prompt": "qa:", "solution": "1"}, {"prompt": "qb:", "solution": "2"}]


def gold_table_reward(completions, solution, **kwargs):
    """Group a: 1, 0, 0, 1 by position; group b: all 0 (all wrong, so it gets the gold); the gold text scores 0.5."""
    return [0.5 if c == "zq" + s else float(i < G and i % 3 == 0)
            for i, (c, s) in enumerate(zip(completions, solution, strict=True))]


def perturbed_old_logps(trainer, model, batch, scale, seed):
    with torch.no_grad():
        logp = policy_logps(trainer, model, batch)
    return logp + scale * torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))


def test_gcpo_trainer_and_verl_agree(tmp_path, tok):
    from datasets import Dataset

    from grouprl_trl import GCPOConfig, GCPOTrainer

    model = build_tiny_model(tok, seed=2)
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, max_completion_length=T, gold_template="zq{solution}"))
    trainer = GCPOTrainer(model=model, reward_funcs=gold_table_reward, args=args,
                          train_dataset=Dataset.from_list(GOLD_ROWS), processing_class=tok)
    model.train()
    batch = trainer._generate_and_score_completions([dict(r) for r in GOLD_ROWS for _ in range(G)])
    model.eval()  # the loss without gradient-accumulation division
    texts = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    assert texts[2 * G - 1] == "zq2"  # the all-wrong group's last rollout is the gold completion
    rewards = torch.tensor(gold_table_reward(texts, [r["solution"] for r in GOLD_ROWS for _ in range(G)]))
    assert rewards.tolist() == [1, 0, 0, 1, 0, 0, 0, 0.5]
    # sequence log-ratios of a few 1e-4: GSPO's clip (3e-4 / 4e-4) binds on some sequences only
    batch["old_per_token_logps"] = perturbed_old_logps(trainer, model, batch, 8e-4, seed=2)

    data = verl_batch(batch, old_log_probs=batch["old_per_token_logps"], rewards=rewards)
    data.batch["advantages"] = advantages(data, "grouprl_gcpo")  # default eps: TRL's 1e-4
    mask = batch["completion_mask"].float()
    torch.testing.assert_close(data.batch["advantages"][UNPERM], batch["advantages"].unsqueeze(-1) * mask)

    config = actor_config("gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4)  # GCPO-gold's loss is verl's gspo
    trl_loss = trainer.compute_loss(model, batch)
    ours = verl_loss("gspo", data, policy_logps(trainer, model, batch)[PERM], "seq-mean-token-mean", config)
    torch.testing.assert_close(ours, trl_loss)
    assert 0 < trainer._metrics["eval"]["clip_ratio/region_mean"][-1] < 1  # TRL's metric: clipped sequences
    assert_same_grads(
        grads(model, trainer.compute_loss(model, batch)),
        grads(model, verl_loss("gspo", data, policy_logps(trainer, model, batch)[PERM], "seq-mean-token-mean", config)),
    )


# ----------------------------------------------------------------------------- COPO
def position_reward(completions, **kwargs):
    return [float(REWARDS[i % (2 * G)]) for i in range(len(completions))]


class ScriptedAnswers:
    """An answer extractor returning ``answers[i % len]`` for the i-th completion it sees (None: no answer)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def __call__(self, completion):
        self.calls += 1
        return self.answers[(self.calls - 1) % len(self.answers)]


# group a: 7, none, blank, 7 with rewards 1, 0, 0, 1; group b: 9, blank, none, 9, all rewards 1. TRL keys an answerless
# completion by its reward (grouprl_core.copo.answer_keys): H = 1 bit in both groups. verl reads the same answers as
# the reward function's `pred` ("" / blank / None) and must key them the same way.
MISSING_ANSWERS = ["7", None, "", "7", "9", "  ", None, "9"]


@pytest.mark.parametrize("blend, scripted", [("only-soft", False), ("soft-with-zero", False), ("only-soft", True)])
def test_copo_trainer_and_verl_agree(tmp_path, tok, blend, scripted):
    from grouprl_trl import COPOConfig, COPOTrainer

    model = build_tiny_model(tok, seed=3)
    extractor = ScriptedAnswers(MISSING_ANSWERS) if scripted else toy_extract_answer
    args = COPOConfig(**tiny_trainer_kwargs(tmp_path, max_completion_length=T, blend=blend, answer_extractor=extractor))
    trainer = COPOTrainer(model=model, reward_funcs=position_reward, args=args,
                          train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(G)])
    model.eval()
    texts = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    # verl's `pred`: what the reward function extracted, raw ("" or None where it found nothing)
    answers = MISSING_ANSWERS if scripted else [toy_extract_answer(t) for t in texts]
    if scripted:
        assert extractor.calls == 2 * G
        # H = 1 bit per group by hand -> gate sigmoid(5 (1 - 1)) = 0.5 for every sample
        assert batch["copo_local_weight"].tolist() == pytest.approx([0.5] * (2 * G))
    batch["old_per_token_logps"] = perturbed_old_logps(trainer, model, batch, 0.4, seed=3)  # clips bind

    data = verl_batch(batch, old_log_probs=batch["old_per_token_logps"], answers=answers)
    data.batch["advantages"] = advantages(data, "grouprl_copo")
    metrics = hooks.attach_copo_fields(data, COPOOptions(blend=blend))
    copo_names = [k for k in trainer._metrics["train"] if k.startswith("copo/")]
    assert metrics == pytest.approx({k: trl_metric(trainer, k) for k in copo_names})  # same names, same values
    mask = batch["completion_mask"].float()
    torch.testing.assert_close(data.batch["advantages"][UNPERM], batch["advantages"].unsqueeze(-1) * mask)
    torch.testing.assert_close(data.batch["grouprl_copo_global"][UNPERM], batch["copo_global_advantages"])
    torch.testing.assert_close(data.batch["grouprl_copo_weight"][UNPERM], batch["copo_local_weight"])
    assert batch["copo_global_advantages"].abs().sum() > 0  # group b (all correct) has a global signal

    extras = {k: data.batch[k] for k in ("grouprl_copo_local", "grouprl_copo_global", "grouprl_copo_weight")}
    config = actor_config("grouprl_copo", clip_ratio_c=3.0)

    def verl_copo_loss():
        with losses.loss_extras(extras):
            return verl_loss("grouprl_copo", data, policy_logps(trainer, model, batch)[PERM], "seq-mean-token-mean",
                             config)

    torch.testing.assert_close(verl_copo_loss(), trainer.compute_loss(model, batch))
    assert trainer._metrics["eval"]["clip_ratio/region_mean"][-1] > 0
    assert_same_grads(grads(model, trainer.compute_loss(model, batch)), grads(model, verl_copo_loss()))


# ============================================================================ through both trainers, with the hooks
# The tests below drive each side through its trainer: TRL's ``_generate_and_score_completions`` on the grouprl
# trainer (sampling with the tiny model), verl's ``GroupRLRayPPOTrainer`` hooks (``before_old_log_prob``,
# ``_update_actor``) and ``compute_advantage`` on DataProtos holding the same rows, with fakes only for verl's
# worker group and reward loop.
def verl_trainer(algo, tok, **options):
    """``GroupRLRayPPOTrainer`` built as ``GroupRLTaskRunner`` builds it, minus Ray (no ``RayPPOTrainer.__init__``):
    the composed shipped YAML, the validated options, the tokenizer."""
    from test_verl_configs import compose_config

    from grouprl_verl.config import algo_options
    from grouprl_verl.trainer import GroupRLRayPPOTrainer

    composed = compose_config(f"grouprl_{algo}", [f"++algorithm.grouprl.{algo}.{k}={v}" for k, v in options.items()])
    trainer = object.__new__(GroupRLRayPPOTrainer)
    trainer.config, trainer.tokenizer = composed, tok
    trainer.grouprl_algo, trainer.grouprl_options = algo, algo_options(composed.algorithm, algo)
    trainer.skip_report, trainer.global_steps = trainer._make_skip_report(), 1  # what __init__ / fit set up
    return trainer


def trl_metric(trainer, name):
    return trainer._metrics["train"][name][-1]


# ----------------------------------------------------------------------------- GPG: threshold, carry-over, fill
GPG_GROUPS = 4
# valid flags of each generation round (4 groups); a fit/TRL batch is [first round, extra round]
GPG_ROUNDS = [
    [True, False, False, False], [True, True, True, True],  # step 1: 1/4 valid -> one extra round; one left over
    [True, True, True, True],  # step 2: carried + 4 valid: no extra round, one of this round's valid groups left over
    [False, True, False, True],  # step 3: carried + 2 = 3/4: no extra round, one zero-variance group fills
    [False, False, False, False], [False, True, False, False],  # step 4: the round bound stops at 1/4; fillers
]
GPG_STEPS = [(0, 1), (2,), (3,), (4, 5)]  # rounds of each step: the step's batch, then extra rounds
# by hand from GPG_ROUNDS: valid groups oldest first (the carry first), in generation order within a round
GPG_EXPECTED = [
    ({(0, 0), (1, 0), (1, 1), (1, 2)}, {(1, 3)}),
    ({(1, 3), (2, 0), (2, 1), (2, 2)}, {(2, 3)}),
    ({(2, 3), (3, 1), (3, 3), (3, 0)}, set()),
    ({(5, 1), (5, 0), (5, 2), (5, 3)}, set()),
]


def gpg_round_rewards(r):
    """Rewards of round r: group k's members share base 10 r + k (so a group's rewards name it), a valid
    group's last member gets + 0.5."""
    out = []
    for k, valid in enumerate(GPG_ROUNDS[r]):
        out += [10.0 * r + k] * (G - 1) + [10.0 * r + k + (0.5 if valid else 0.0)]
    return out


def uid_order(data) -> list[str]:
    return list(dict.fromkeys(str(u) for u in data.non_tensor_batch["uid"]))


def group_of(rewards_of_group) -> tuple[int, int]:
    base = int(min(rewards_of_group))
    return base // 10, base % 10


def test_gpg_batches_through_both_trainers(tmp_path, tok):
    """The same generation rounds (same rewards per round) assembled by TRL's GPGTrainer and verl's
    GroupRLRayPPOTrainer (GPGGroupAssembler in before_old_log_prob): the same groups per step, the same carry,
    the same metrics, the same GPG advantages per row."""
    from grouprl_trl import GPGConfig, GPGTrainer

    calls = []

    def scripted_reward(completions, **kwargs):  # TRL scores every generation round with one call
        calls.append(len(completions))
        return gpg_round_rewards(len(calls) - 1)

    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, per_device_train_batch_size=G * GPG_GROUPS,
                                           max_resample_rounds=1, max_completion_length=2))
    trainer = GPGTrainer(model=build_tiny_model(tok, seed=4), reward_funcs=scripted_reward, args=args,
                         train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    trainer.model.train()

    verl = verl_trainer("gpg", tok, max_resample_rounds=1)
    verl._gpg_assembler = hooks.GPGGroupAssembler(verl.grouprl_options)
    verl._rewrites_rows, verl._generation_order = True, None
    verl.actor_rollout_wg = SimpleNamespace(_dispatch_info={"actor": [0]})  # one DP rank, as _balance_batch asks
    rounds = iter(range(len(GPG_ROUNDS)))

    def verl_round():
        """Round r in generation order (group by group, as the agent loop returns it), rows of random lengths."""
        r = next(rounds)
        n = G * GPG_GROUPS
        rm = torch.zeros(n, 2)
        rm[:, -1] = torch.tensor(gpg_round_rewards(r))
        # group k's rows hold 4 - k tokens: _balance_batch (one DP rank) sorts rows by length, short ones at both
        # ends, so the balanced row order meets the groups in reverse
        lengths = torch.tensor([4 - i // G for i in range(n)])
        attention = (torch.arange(4).expand(n, 4) >= 4 - lengths.unsqueeze(1)).long()  # left-padded
        return DataProto.from_dict(
            tensors={"rm_scores": rm, "response_mask": torch.ones(n, 2), "attention_mask": attention},
            non_tensors={"uid": np.array([f"r{r}g{i // G}" for i in range(n)], dtype=object)})

    verl._generate_round = verl_round
    dataset = build_toy_dataset(num_rows=8)
    for step in range(len(GPG_STEPS)):
        batch = trainer._generate_and_score_completions([dataset[i] for i in range(GPG_GROUPS) for _ in range(G)])
        trl_rewards = batch["gpg_rewards"].view(GPG_GROUPS, G)
        trl_groups = [group_of(g.tolist()) for g in trl_rewards]
        trl_carry = [] if trainer._carry is None else [group_of(g.tolist()) for g in trainer._carry["gpg_rewards"].view(-1, G)]

        data = verl_round()
        generation_order = uid_order(data)
        verl._balance_batch(data, metrics={})  # fit balances the step's batch: rows sorted by length
        assert uid_order(data) != generation_order  # (so the threshold must not count groups in row order)
        verl.before_old_log_prob(data)  # the hook fit calls before the old log-prob pass
        data.batch["token_level_rewards"] = data.batch["rm_scores"]
        cfg = verl.config.algorithm
        data = compute_advantage(data, adv_estimator=cfg.adv_estimator, config=cfg)
        uids = [str(u) for u in data.non_tensor_batch["uid"]]
        verl_groups = {(int(u[1:u.index("g")]), int(u[u.index("g") + 1:])) for u in uids}
        carry = verl._gpg_assembler.carry
        verl_carry = set() if carry is None else {(int(u[1:u.index("g")]), int(u[u.index("g") + 1:]))
                                                   for u in carry.non_tensor_batch["uid"]}

        expected, expected_carry = GPG_EXPECTED[step]
        assert set(trl_groups) == verl_groups == expected, step
        assert set(trl_carry) == verl_carry == expected_carry, step
        assert verl._grouprl_metrics[names.GPG_RESAMPLE_ROUNDS] == len(GPG_STEPS[step]) - 1
        for name in (names.GPG_RESAMPLE_ROUNDS, names.GPG_EXTRA_PROMPTS, names.GPG_CARRIED_FRAC):
            assert verl._grouprl_metrics[name] == trl_metric(trainer, name), (step, name)
        for name in (names.GPG_ALPHA, names.GPG_VALID_FRACTION, names.GPG_SKIPPED_STEP):
            assert estimators.LAST_METRICS[name] == pytest.approx(trl_metric(trainer, name)), (step, name)
        # GPG advantages row by row, matched by (group, reward)
        trl_adv = {(group_of(trl_rewards[k].tolist()), float(trl_rewards[k, j])): float(batch["advantages"][k * G + j])
                   for k in range(GPG_GROUPS) for j in range(G)}
        verl_rewards = data.batch["token_level_rewards"].sum(-1)
        for i, u in enumerate(uids):
            key = ((int(u[1:u.index("g")]), int(u[u.index("g") + 1:])), float(verl_rewards[i]))
            assert float(data.batch["advantages"][i, -1]) == pytest.approx(trl_adv[key], abs=1e-6), (step, key)
    assert calls == [G * GPG_GROUPS] * len(GPG_ROUNDS)


# ----------------------------------------------------------------------------- GCPO-gold: injection on both sides
GOLD_T = 27  # the default template around a one-digit reference is 27 tokens: with EOS it does not fit, so cut
GOLD_REFS = ["1", "2", "   "]  # group c's reference is blank: no gold on either backend
GOLD_PERM = torch.tensor([3, 9, 0, 4, 8, 1, 6, 10, 2, 5, 11, 7])  # keeps each group's last member last (see below)


def test_gold_injection_through_both_trainers(tmp_path, tok, monkeypatch):
    """The same sampled rollouts go through TRL's GCPOTrainer and verl's GroupRLRayPPOTrainer.before_old_log_prob
    (the gold hook, default template on both sides): the same groups get the same gold tokens (cut like a
    sampled completion), the same rewards, GRPO advantages and gold metrics.

    verl replaces the group's last row in the batch's (balanced) order, TRL the last sampled member; both are one
    of the group's rollouts, and the verl rows here are permuted so that the two coincide."""
    from datasets import Dataset

    from grouprl_trl import GCPOConfig, GCPOTrainer
    from grouprl_trl._compat import TRLHooks

    # what the reward functions see for a gold completion: the tiny tokenizer keeps letters and digits only
    gold_seen = {s: tok.decode(tok.encode(f"<think>\n{s}\n</think>\n\\boxed{{{s}}}", add_special_tokens=False),
                               skip_special_tokens=True) for s in GOLD_REFS}

    def reward(completions, solution, **kwargs):
        """Group a: 1, 0, 0, 1 by position (no gold); groups b, c: all 0 (all wrong); a gold text scores 0.5."""
        return [0.5 if c == gold_seen[s] else float(i < G and i % 3 == 0)
                for i, (c, s) in enumerate(zip(completions, solution, strict=True))]

    sampled = []
    generate = TRLHooks.generate_rollouts
    monkeypatch.setattr(TRLHooks, "generate_rollouts", lambda self, p: sampled.append(generate(self, p)) or sampled[-1])
    rows = [{"prompt": f"q{k}:", "solution": s} for k, s in enumerate(GOLD_REFS)]
    args = GCPOConfig(**tiny_trainer_kwargs(tmp_path, per_device_train_batch_size=G * 3, max_completion_length=GOLD_T))
    trainer = GCPOTrainer(model=build_tiny_model(tok, seed=5), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(G)])
    (rollouts,) = sampled  # the rollouts as sampled, before TRL's injection
    texts = tok.batch_decode([torch.tensor(ids) for ids in rollouts.completion_ids], skip_special_tokens=True)
    solutions = [r["solution"] for r in rows for _ in range(G)]
    sampled_rewards = torch.tensor(reward(texts, solutions))
    assert sampled_rewards.tolist() == [1, 0, 0, 1] + [0] * 8

    # verl: the same rollouts as the agent loop returns them (prompt left-padded, response right-padded to the
    # response length), rm_scores on the last response token, the reference as a dataset column
    n = len(solutions)
    prompt = torch.tensor([ids for ids in rollouts.prompt_ids])
    responses = torch.full((n, GOLD_T), tok.pad_token_id)
    mask = torch.zeros(n, GOLD_T, dtype=torch.long)
    rm = torch.zeros(n, GOLD_T)
    for i, ids in enumerate(rollouts.completion_ids):
        responses[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
        rm[i, len(ids) - 1] = sampled_rewards[i]
    attention = torch.cat([torch.ones_like(prompt), mask], 1)
    data = DataProto.from_dict(
        tensors={"prompts": prompt, "responses": responses, "response_mask": mask, "rm_scores": rm,
                 "input_ids": torch.cat([prompt, responses], 1), "attention_mask": attention,
                 "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)},
        non_tensors={"uid": np.array([f"uid{i // G}" for i in range(n)], dtype=object),
                     "solution": np.array(solutions, dtype=object)},
    ).select_idxs(GOLD_PERM.numpy())
    scored = []

    def reward_loop(gold_rows):  # verl's reward loop on the rewritten rows, scoring the text as `reward` does
        scored.append(len(gold_rows))
        out = torch.zeros(len(gold_rows), GOLD_T)
        for i, (ids, m) in enumerate(zip(gold_rows.batch["responses"], gold_rows.batch["response_mask"])):
            seen = tok.decode(ids[m.bool()], skip_special_tokens=True)
            out[i, int(m.sum()) - 1] = 0.5 if seen in gold_seen.values() else 0.0
        return DataProto.from_dict(tensors={"rm_scores": out})

    verl = verl_trainer("gcpo", tok)
    verl.score_rows = reward_loop
    verl.before_old_log_prob(data)  # the hook fit calls after rewards, before the old log-prob pass
    assert scored == [1]  # only group b's gold row was scored
    unperm = torch.argsort(GOLD_PERM)
    trl_rows = [i for i, ids in enumerate(rollouts.completion_ids) if batch["completion_ids"][i][: len(ids)].tolist() != ids
                or batch["completion_mask"][i].sum() != len(ids)]
    assert trl_rows == [2 * G - 1] and GOLD_PERM[verl._gold_rows].tolist() == trl_rows  # group b's last member
    row = trl_rows[0]
    gold = data.batch["responses"][unperm[row]]
    assert gold[data.batch["response_mask"][unperm[row]].bool()].tolist() == \
        batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
    assert tok.eos_token_id not in gold.tolist() and int(data.batch["response_mask"][unperm[row]].sum()) == GOLD_T

    rewards = data.batch["rm_scores"].sum(-1)[unperm]
    trl_rewards = trainer._last_rewards_per_func.sum(-1)
    assert rewards.tolist() == trl_rewards.tolist() == [1, 0, 0, 1, 0, 0, 0, 0.5, 0, 0, 0, 0]
    data.batch["token_level_rewards"] = data.batch["rm_scores"]
    cfg = verl.config.algorithm
    adv = compute_advantage(data, adv_estimator=cfg.adv_estimator, config=cfg).batch["advantages"][unperm]
    trl_mask = torch.zeros(n, GOLD_T)
    trl_mask[:, : batch["completion_mask"].size(1)] = batch["completion_mask"]
    torch.testing.assert_close(adv, batch["advantages"].unsqueeze(-1) * trl_mask)
    # the same gold metrics, by name: 1 of 3 groups, the sampled mean 2/12, the gold row's 0.5 (below the
    # correct_threshold 1), cut
    verl_gold = {k: v for k, v in verl._grouprl_metrics.items() if k.startswith("gold/")}
    trl_gold = {k: trl_metric(trainer, k) for k in trainer._metrics["train"] if k.startswith("gold/")}
    assert verl_gold == pytest.approx(trl_gold)
    assert trl_gold == pytest.approx({names.GOLD_INJECTED_FRAC: 1 / 3, names.GOLD_SAMPLED_REWARD_MEAN: 2 / 12,
                                      names.GOLD_REWARD_MEAN: 0.5, names.GOLD_TRUNCATED_FRAC: 1.0,
                                      names.GOLD_BELOW_THRESHOLD_FRAC: 1.0})


# ----------------------------------------------------------------------------- GCPO-guidance: filter, negative pass
class TinyActorWG:
    """verl's actor worker group, reduced to the two calls the guidance hook makes: ``compute_log_prob`` runs the
    tiny model on the no-padding TensorDict as the FSDP engine does (the fit tier's stand-in), ``update_actor``
    records that it was called."""

    def __init__(self, model):
        self.model, self.updates, self.log_prob_calls = model, 0, 0

    def compute_log_prob(self, td):
        from verl.utils import tensordict_utils as tu
        from verl_fit_standins import forward_no_padding

        self.log_prob_calls += 1
        with torch.no_grad():
            return tu.get_tensordict(tensor_dict=forward_no_padding(self.model, td, False), non_tensor_dict={})

    def update_actor(self, td):
        from verl.utils import tensordict_utils as tu

        self.updates += 1
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0}})


def test_guidance_through_both_trainers(tmp_path, tok, monkeypatch):
    """The same sampled batch through TRL's GuidanceGCPOTrainer (filter + old-policy weights in its generation
    batch) and verl's GroupRLRayPPOTrainer._update_actor (filter, negative-context compute_log_prob from the chat
    template, token weights): the same kept rows, token advantages, guidance metrics and loss."""
    from datasets import Dataset

    from grouprl_trl.base import GroupRLTrainer
    from grouprl_trl.guidance import GuidanceGCPOConfig, GuidanceGCPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"q{k}:"}]} for k in (3, 8)]  # conversational: chat template
    model = build_tiny_model(tok, seed=6)
    args = GuidanceGCPOConfig(**tiny_trainer_kwargs(tmp_path, max_completion_length=T), weights_from="old_policy")
    trainer = GuidanceGCPOTrainer(model=model, reward_funcs=position_reward, args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tok)
    unfiltered = []
    scored_round = GroupRLTrainer.scored_round
    monkeypatch.setattr(GroupRLTrainer, "scored_round",
                        lambda self, inputs: unfiltered.append(scored_round(self, inputs)) or unfiltered[-1])
    model.train()
    filtered = trainer._generate_and_score_completions([dict(r) for r in rows for _ in range(G)])
    model.eval()
    (sampled,) = unfiltered
    assert filtered["completion_ids"].size(0) == G  # group b (all correct) left the batch

    # verl: the same rows (shuffled), GRPO advantages from verl's estimator, old log-probs of the same policy
    with torch.no_grad():
        old = policy_logps(trainer, model, sampled)
    data = verl_batch(sampled, old_log_probs=old)
    raw_prompt = np.empty(2 * G, dtype=object)
    raw_prompt[:] = [rows[i // G]["prompt"] for i in range(2 * G)]
    data.non_tensor_batch["raw_prompt"] = raw_prompt[PERM.numpy()]
    verl = verl_trainer("guidance", tok)
    verl.actor_rollout_wg = wg = TinyActorWG(model)
    cfg = verl.config.algorithm
    data.batch["advantages"] = compute_advantage(data, adv_estimator=cfg.adv_estimator, config=cfg).batch["advantages"]
    out = verl._update_actor(data)  # the hook fit calls after the advantages
    assert wg.log_prob_calls == 1 and wg.updates == 1

    kept = PERM < G  # verl rows holding group a
    assert data.batch["response_mask"][~kept].sum() == 0
    weights = filtered["guidance_weights"][filtered["completion_mask"].bool()]
    assert weights.max() - weights.min() > 0.1  # token weights that vary: the negative pass decided them
    expected = filtered["advantages"].unsqueeze(-1) * filtered["guidance_weights"] * filtered["completion_mask"]
    torch.testing.assert_close(data.batch["advantages"][kept], expected[PERM[kept]], rtol=1e-5, atol=1e-6)
    guidance = {k: v for k, v in out.meta_info["metrics"].items() if k.startswith("guidance/")}
    assert guidance == pytest.approx({k: trl_metric(trainer, k) for k in trainer._metrics["train"]
                                      if k.startswith("guidance/")}, rel=1e-5)
    assert guidance[names.GUIDANCE_KEPT_FRAC] == 0.5 and guidance[names.GUIDANCE_SKIPPED_STEP] == 0.0

    config = actor_config("grouprl_guidance", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    ours = verl_loss("grouprl_guidance", data, policy_logps(trainer, model, sampled)[PERM], "token-mean", config)
    torch.testing.assert_close(ours, trainer.compute_loss(model, filtered))
