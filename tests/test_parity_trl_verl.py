"""TRL and verl adapters give the same advantages and losses on the same batch, for every algorithm.

One shared fixture: 2 prompts x 4 completions, completion width 4 with ragged lengths, rewards with
one valid and one all-correct group. TRL sees it in its layout (groups contiguous); verl sees it as
a DataProto in a *shuffled* row order (as after ``_balance_batch``) with uuid-like uids and the
reward on the last response token.

* GPG and GCPO-guidance: the TRL side is the trainers' own methods (``GPGTrainer._set_gpg_advantages``
  and ``compute_loss``; ``GuidanceGCPOTrainer._dynamic_filter``, ``_old_policy_weights``,
  ``_negative_logps``, ``compute_loss``) on the tiny model; the verl side is ``compute_advantage``,
  the hooks and the registered loss fed with the same model's log-probs. Losses and their
  gradients on the model's parameters must agree.
* GCPO-gold and COPO: the TRL side is the trainers' own generation batch
  (``_generate_and_score_completions`` on the tiny model, with the gold injection resp. COPO's
  advantages, gate and blend weights) and TRL's / COPO's ``compute_loss``; the verl side is
  ``compute_advantage`` with the registered estimator (+ ``attach_copo_fields``) and verl's ``gspo`` /
  the registered ``grouprl_copo`` loss on the same rows, in verl's shuffled order.
"""

from __future__ import annotations

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
from grouprl_core.copo import answer_keys  # noqa: E402
from grouprl_core.grpo import GRPO_STD_EPS  # noqa: E402
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_extract_answer  # noqa: E402
from grouprl_verl import hooks, losses  # noqa: E402
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
    data.batch["advantages"] = advantages(data, "grouprl_guidance", guidance={"eps": 1e-4})
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
    data.batch["advantages"] = advantages(data, "grouprl_gcpo", gcpo={"eps": GRPO_STD_EPS})
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


@pytest.mark.parametrize("blend", ["only-soft", "soft-with-zero"])
def test_copo_trainer_and_verl_agree(tmp_path, tok, blend):
    from grouprl_trl import COPOConfig, COPOTrainer

    model = build_tiny_model(tok, seed=3)
    args = COPOConfig(**tiny_trainer_kwargs(tmp_path, max_completion_length=T, blend=blend,
                                            answer_extractor=toy_extract_answer))
    trainer = COPOTrainer(model=model, reward_funcs=position_reward, args=args,
                          train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(G)])
    model.eval()
    texts = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    answers = answer_keys([toy_extract_answer(t) for t in texts], REWARDS.tolist())
    batch["old_per_token_logps"] = perturbed_old_logps(trainer, model, batch, 0.4, seed=3)  # clips bind

    data = verl_batch(batch, old_log_probs=batch["old_per_token_logps"], answers=answers)
    data.batch["advantages"] = advantages(data, "grouprl_copo")
    hooks.attach_copo_fields(data, COPOOptions(blend=blend))
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
