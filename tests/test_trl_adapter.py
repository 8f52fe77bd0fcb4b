"""The shared TRL adapter (grouprl_trl.base / grouprl_trl._compat) on every trainer, through TRL's own
``train()`` where a loss or a log is checked:

* the MoE router aux loss: ``loss(coef c) - loss(coef 0) == c * aux_loss``, with the aux loss
  recomputed by a plain forward of the model on the same rows;
* the completions table (``log_completions``) holds exactly the rows and advantages the loss saw;
* the policy forward receives exactly the keyword arguments TRL's own ``_compute_loss`` passes;
* COPO's KL term against a hand computation of the k3 estimator (a flipped sign fails).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_trainer_kwargs
from trl import GRPOTrainer

from grouprl_trl import (
    COPOConfig,
    COPOTrainer,
    GCPOConfig,
    GCPOTrainer,
    GPGConfig,
    GPGTrainer,
    GuidanceGCPOConfig,
    GuidanceGCPOTrainer,
)
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, save_tiny_model, toy_extract_answer

G = 4


def alternating_reward(completions, **kwargs):
    """1, 0, 1, 0, ... by position: every group of 4 has non-equal rewards."""
    return [float(i % 2 == 0) for i in range(len(completions))]


TRAINERS = {
    "gpg": (GPGTrainer, GPGConfig, {}),
    "gcpo": (GCPOTrainer, GCPOConfig, {}),
    "copo": (COPOTrainer, COPOConfig, {"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"}),
    "guidance": (GuidanceGCPOTrainer, GuidanceGCPOConfig, {"dynamic_filter": False}),
}


def build_tiny_moe_model(tokenizer, seed: int = 0):
    """A randomly initialised 2-layer Qwen2-MoE (4 experts, top 2) with the tiny tokenizer's vocabulary.

    ``output_router_logits`` stays False in the config (generation runs without router logits); TRL asks
    for them in the loss forward because the config has the attribute and ``router_aux_loss_coef`` != 0.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[], num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, output_router_logits=False, router_aux_loss_coef=0.01,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def wrap_compute_loss(trainer, after):
    """Run ``after(model, inputs, loss)`` on every ``compute_loss`` call TRL's training loop makes."""
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        loss = original(model, inputs, *args, **kwargs)
        after(model, inputs, loss)
        return loss

    trainer.compute_loss = compute_loss
    return original


# ----------------------------------------------------------------------------- MoE aux loss
@pytest.mark.parametrize("name", list(TRAINERS))
def test_moe_router_aux_loss_is_added_with_its_coefficient(tmp_path, name):
    trainer_cls, config_cls, fields = TRAINERS[name]
    tok = build_tokenizer()
    coef = 0.25
    args = config_cls(**tiny_trainer_kwargs(tmp_path, max_steps=1, router_aux_loss_coef=coef, **fields))
    trainer = trainer_cls(model=build_tiny_moe_model(tok), reward_funcs=alternating_reward, args=args,
                          train_dataset=build_toy_dataset(num_rows=16), processing_class=tok)
    assert trainer.aux_loss_enabled
    checks = []

    def check(model, inputs, loss):
        trainer.router_aux_loss_coef = 0.0  # same rows, no aux term
        with torch.no_grad():
            without_aux = original(model, inputs)
        trainer.router_aux_loss_coef = coef
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad():  # the model's own load-balancing loss on the same rows (transformers, not grouprl)
            aux = model(input_ids=ids, attention_mask=attention, output_router_logits=True).aux_loss
        checks.append((float(loss.detach() - without_aux), coef * float(aux) / trainer.current_gradient_accumulation_steps))

    original = wrap_compute_loss(trainer, check)
    trainer.train()
    assert checks, "compute_loss never ran"
    for got, expected in checks:
        assert expected > 1e-3  # a real aux loss, not a vanishing one
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]


# ----------------------------------------------------------------------------- completions table
class CallPattern:
    """Rewards by call and position: on the first call only group 0 is valid, later every group is."""

    __name__ = "call_pattern"

    def __init__(self):
        self.calls = 0

    def __call__(self, completions, **kwargs):
        self.calls += 1
        if self.calls == 1:
            return [float(i == 0) for i in range(len(completions))]
        return [float(i % 2 == 0) for i in range(len(completions))]


def group_pattern_reward(completions, solution, **kwargs):
    """By group position: group 0 all 1, group 1 all 0 (all wrong: GCPO-gold injects; both are dropped by
    the guidance filter), other groups 1, 0, 1, 0; a gold text ("zq" + solution) scores 0.5."""
    pattern = {0: [1.0] * G, 1: [0.0] * G}
    return [
        0.5 if c == "zq" + s else pattern.get(i // G, [1.0, 0.0, 1.0, 0.0])[i % G]
        for i, (c, s) in enumerate(zip(completions, solution, strict=True))
    ]


TABLE_CASES = {
    # GPG: the first round has 1 valid group of 4, a second round fills the batch, 1 group is carried
    "gpg_threshold": (GPGTrainer, GPGConfig, {"valid_threshold": 0.75}, CallPattern),
    "gcpo_replace": (GCPOTrainer, GCPOConfig, {"gold_template": "zq{solution}"}, lambda: group_pattern_reward),
    "gcpo_append": (GCPOTrainer, GCPOConfig, {"gold_template": "zq{solution}", "gold_placement": "append"},
                    lambda: group_pattern_reward),
    "copo": (COPOTrainer, COPOConfig, {"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"},
             lambda: group_pattern_reward),
    "guidance_filter": (GuidanceGCPOTrainer, GuidanceGCPOConfig, {}, lambda: group_pattern_reward),
}


@pytest.mark.parametrize("case", list(TABLE_CASES))
def test_completions_table_shows_the_rows_and_advantages_the_loss_used(tmp_path, case):
    trainer_cls, config_cls, fields, make_reward = TABLE_CASES[case]
    tok = build_tokenizer()
    args = config_cls(**tiny_trainer_kwargs(tmp_path, max_steps=1, per_device_train_batch_size=16, **fields))
    trainer = trainer_cls(model=build_tiny_model(tok), reward_funcs=make_reward(), args=args,
                          train_dataset=build_toy_dataset(num_rows=64), processing_class=tok)
    trained = Counter()

    def record(model, inputs, loss):
        for ids, advantage in zip(inputs["completion_ids"], inputs["advantages"], strict=True):
            trained[(tok.decode(ids, skip_special_tokens=True), round(float(advantage), 4))] += 1

    wrap_compute_loss(trainer, record)
    trainer.train()
    table = trainer._logs  # TRL's completions table (what log_completions prints and writes)
    logged = Counter(
        (c, round(float(a), 4)) for c, a in zip(table["completion"], table["advantages"], strict=True)
    )
    assert sum(trained.values()) >= 8
    assert logged == trained
    assert any(a != 0 for _, a in trained)  # the check compares real advantages, not only zeros


# ----------------------------------------------------------------------------- forward kwargs
class Recorded(Exception):
    pass


def recorded_forward_kwargs(trainer, call) -> dict:
    """The keyword arguments of the loss's policy forward (the call that asks for entropies)."""
    calls = []

    def fake(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        calls.append(kwargs)
        if kwargs.get("compute_entropy"):
            raise Recorded
        return torch.zeros(input_ids.size(0), logits_to_keep), None, None

    trainer._get_per_token_logps_and_entropies = fake
    try:
        with pytest.raises(Recorded):
            call()
    finally:
        del trainer._get_per_token_logps_and_entropies
    return calls[-1]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_policy_forward_gets_every_input_trl_passes(tmp_path, name):
    trainer_cls, config_cls, fields = TRAINERS[name]
    if name == "guidance":
        fields = {**fields, "weights_from": "old_policy"}
    tok = build_tokenizer()
    trainer = trainer_cls(model=build_tiny_model(tok), reward_funcs=alternating_reward,
                          args=config_cls(**tiny_trainer_kwargs(tmp_path, **fields)),
                          train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    trainer.model.eval()
    ids = torch.tensor([[5, 6, 7]] * 8)
    batch = {
        "prompt_ids": ids, "prompt_mask": torch.ones_like(ids), "completion_ids": ids,
        "completion_mask": torch.ones_like(ids), "advantages": torch.linspace(-1, 1, 8),
        "num_items_in_batch": torch.tensor(24.0),
        "copo_global_advantages": torch.zeros(8), "copo_local_weight": torch.ones(8),
        "guidance_weights": torch.ones(8, 3), "guidance_divergence": torch.zeros(8, 3),
    }
    multimodal = ["pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"]
    batch.update({key: object() for key in multimodal})  # sentinels: they must reach the forward untouched
    trl_kwargs = recorded_forward_kwargs(trainer, lambda: GRPOTrainer._compute_loss(trainer, trainer.model, batch))
    ours = recorded_forward_kwargs(trainer, lambda: trainer.compute_loss(trainer.model, batch))
    assert set(trl_kwargs) >= set(multimodal)  # TRL passes every multimodal input of the batch
    assert ours.keys() == trl_kwargs.keys()
    for key, value in trl_kwargs.items():
        assert ours[key] is value or ours[key] == value, key


# ----------------------------------------------------------------------------- COPO KL
def test_copo_kl_term_is_beta_times_k3_of_reference_minus_policy(tmp_path):
    tok = build_tokenizer()
    path = save_tiny_model(tmp_path / "model")  # beta > 0 loads the reference model from a path
    args = COPOConfig(**tiny_trainer_kwargs(tmp_path / "out", beta=0.3, answer_extractor=toy_extract_answer))
    trainer = COPOTrainer(model=str(path), reward_funcs=alternating_reward, args=args,
                          train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(G)]
    batch = trainer._generate_and_score_completions(rows)
    trainer.model.eval()  # eval: no gradient-accumulation division
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        logp = trainer._get_per_token_logps_and_entropies(  # TRL's scoring, not ours
            trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), batch["completion_ids"].size(1),
        )[0]
    shift = 0.7 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
    batch["ref_per_token_logps"] = logp + shift  # a reference that differs from the policy

    with torch.no_grad():
        with_kl = trainer.compute_loss(trainer.model, batch)
        trainer.beta = 0.0
        without_kl = trainer.compute_loss(trainer.model, batch)
    # k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 = exp(shift) - shift - 1
    per_seq = []
    for i in range(mask.size(0)):
        n = int(mask[i].sum())
        if n:
            per_seq.append(sum(float(torch.exp(s) - s - 1) for s in shift[i, :n]) / n)
    expected = 0.3 * sum(per_seq) / len(per_seq)  # seq-mean-token-mean, as COPO's loss
    assert float(with_kl - without_kl) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.05
