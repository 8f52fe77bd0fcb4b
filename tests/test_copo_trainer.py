"""COPOTrainer on the tiny model (TRL 1.16, CPU): advantages, gate and blend weights of a real
generation batch against a hand computation from the recorded completions, the loss against a
naive per-sequence loop, the reward-value fallback, buffering with num_iterations and gradient
accumulation, end-to-end metrics, LoRA, YAML through TrlParser and config errors."""

from __future__ import annotations

import math
import statistics
import textwrap

import pytest
import torch
from conftest import tiny_trainer_kwargs

from grouprl_trl import COPOConfig, COPOTrainer
from grouprl_trl.copo import math_answer_extractor
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_extract_answer

G = 4
EXTRACTOR = "grouprl_trl.tiny.toy_extract_answer"  # the toy task's answer: the first character


class PatternReward:
    """Reward by position in the call: group 0 all 1 (all correct), group 1 all 0 (all wrong),
    group 2 [1, 1, 1, 0] (mixed), repeating. Records the completions it scored."""

    __name__ = "pattern_reward"

    def __init__(self):
        self.completions = []

    def __call__(self, prompts, completions, **kwargs):
        self.completions = list(completions)
        pattern = {0: [1.0] * 4, 1: [0.0] * 4, 2: [1.0, 1.0, 1.0, 0.0]}
        return [pattern[(i // G) % 3][i % G] for i in range(len(completions))]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def hand_copo(answers, rewards, k=5.0, b=1.0, blend="only-soft", eps=1e-6):
    """Independent per-group computation of (local, global, local weight, H per group, gate per group)."""
    groups = [range(s, s + G) for s in range(0, len(rewards), G)]
    entropy, prompt_reward = [], []
    for g in groups:
        keys = [answers[i] if answers[i] else f"reward {rewards[i]}" for i in g]
        counts = [keys.count(a) for a in set(keys)]
        entropy.append(-sum(c / G * math.log2(c / G) for c in counts))
        prompt_reward.append(sum(rewards[i] for i in g) / G)
    mean_r, std_r = statistics.mean(prompt_reward), statistics.stdev(prompt_reward)
    local, glob, weight, gates = [], [], [], []
    for q, g in enumerate(groups):
        r = [rewards[i] for i in g]
        std = statistics.stdev(r)
        gate = _sigmoid(k * (entropy[q] - b))
        gates.append(gate)
        for x in r:
            a = 0.0 if max(r) == min(r) else (x - statistics.mean(r)) / (std + eps)
            local.append(a)
            glob.append((prompt_reward[q] - mean_r) / (std_r + eps))
            weight.append({"only-soft": gate, "soft-with-zero": gate * (x != 0), "soft-with-forced": gate * (a != 0),
                           "only-global": 0.0, "no-global": 1.0}[blend])
    return local, glob, weight, entropy, gates, std_r


def _trainer(tmp_path, reward=None, peft_config=None, **overrides):
    tok = build_tokenizer()
    kwargs = tiny_trainer_kwargs(tmp_path, per_device_train_batch_size=12, answer_extractor=EXTRACTOR)
    kwargs.update(overrides)
    return COPOTrainer(
        model=build_tiny_model(tok, seed=0), reward_funcs=reward or PatternReward(), args=COPOConfig(**kwargs),
        train_dataset=build_toy_dataset(num_rows=48, seed=0), processing_class=tok, peft_config=peft_config,
    )


def _rows(trainer, num_prompts=3):
    return [trainer.train_dataset[i] for i in range(num_prompts) for _ in range(G)]  # TRL's layout


def _logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


# ----------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("blend", ["only-soft", "soft-with-zero", "soft-with-forced"])
def test_generation_batch_advantages_gate_and_blend_match_hand_computation(tmp_path, blend):
    reward = PatternReward()
    trainer = _trainer(tmp_path, reward=reward, blend=blend, gate_k=2.0, gate_b=0.5)
    out = trainer._generate_and_score_completions(_rows(trainer))
    rewards = [1.0] * 4 + [0.0] * 4 + [1.0, 1.0, 1.0, 0.0]
    answers = [toy_extract_answer(c) for c in reward.completions]
    local, glob, weight, entropy, gates, std_r = hand_copo(answers, rewards, k=2.0, b=0.5, blend=blend)
    assert out["advantages"].tolist() == pytest.approx(local, abs=1e-5)
    assert out["copo_global_advantages"].tolist() == pytest.approx(glob, abs=1e-5)
    assert out["copo_local_weight"].tolist() == pytest.approx(weight, abs=1e-6)
    assert list(trainer._logs["advantages"]) == pytest.approx(local, abs=1e-5)  # completions table
    # the all-correct and all-wrong groups have no local signal but a global one
    assert all(a == 0 for a in local[:8]) and glob[0] > 0.5 and glob[4] < -0.5
    metrics = trainer._metrics["train"]
    assert metrics["copo/consistency_entropy"][-1] == pytest.approx(statistics.mean(entropy), abs=1e-6)
    assert metrics["copo/gate_mean"][-1] == pytest.approx(statistics.mean(gates), abs=1e-6)
    assert metrics["copo/global_adv_std"][-1] == pytest.approx(std_r, rel=1e-6)  # stdev(1, 0, .75)
    assert metrics["copo/extract_fallback_frac"][-1] == pytest.approx(sum(not a for a in answers) / 12)


def test_without_an_answer_the_reward_value_is_the_answer_and_it_is_logged(tmp_path):
    trainer = _trainer(tmp_path, answer_extractor=None)
    out = trainer._generate_and_score_completions(_rows(trainer))
    # answers = rewards: groups 1,1,1,1 and 0,0,0,0 have H = 0, group 1,1,1,0 has H = h(3/4, 1/4)
    h_mixed = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    metrics = trainer._metrics["train"]
    assert metrics["copo/extract_fallback_frac"][-1] == 1.0
    assert metrics["copo/consistency_entropy"][-1] == pytest.approx(h_mixed / 3, abs=1e-6)
    gate = [_sigmoid(5 * (h - 1)) for h in (0.0, 0.0, h_mixed)]
    assert out["copo_local_weight"].tolist() == pytest.approx([gate[i // G] for i in range(12)], abs=1e-6)


def test_default_extractor_uses_math_verify_strings():
    assert math_answer_extractor("so the result is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert math_answer_extractor([{"role": "assistant", "content": "Answer: 42"}]) == "42"
    assert math_answer_extractor("no number at all") is None


# ----------------------------------------------------------------------------- loss
def naive_loss(ratio, mask, local, glob, weight, eps=0.2, c=3.0):
    """Per-sequence loop of the blended dual-clip PPO loss, token mean then sequence mean."""

    def dual_clip(rho, a):
        loss = max(-rho * a, -min(max(rho, 1 - eps), 1 + eps) * a)
        return min(loss, -c * a) if a < 0 else loss

    per_seq = []
    for i in range(len(local)):
        tokens = [t for t in range(len(mask[i])) if mask[i][t]]
        if tokens:
            per_seq.append(sum(weight[i] * dual_clip(ratio[i][t], local[i])
                               + (1 - weight[i]) * dual_clip(ratio[i][t], glob[i]) for t in tokens) / len(tokens))
    return sum(per_seq) / len(per_seq)


def test_loss_matches_naive_per_sequence_loop(tmp_path):
    reward = PatternReward()
    trainer = _trainer(tmp_path, reward=reward, blend="soft-with-zero")
    batch = trainer._generate_and_score_completions(_rows(trainer))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, batch["completion_ids"].size(1))
    torch.manual_seed(1)
    shift = torch.randn_like(logp) * 0.8  # ratios inside, above and below the clip range
    shift[4, 0] = 1.5  # ratio e^1.5 > 3 on the all-wrong group's negative global advantage: the dual clip binds
    batch["old_per_token_logps"] = logp - shift
    trainer.model.eval()  # no gradient-accumulation division
    loss = trainer._compute_loss(trainer.model, batch)

    rewards = [1.0] * 4 + [0.0] * 4 + [1.0, 1.0, 1.0, 0.0]
    answers = [toy_extract_answer(c) for c in reward.completions]
    local, glob, weight, *_ = hand_copo(answers, rewards, blend="soft-with-zero")
    ratio = torch.exp(shift).tolist()
    expected = naive_loss(ratio, batch["completion_mask"].tolist(), local, glob, weight)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert trainer._metrics["eval"]["clip_ratio/region_mean"][-1] > 0


# ----------------------------------------------------------------------------- end to end
def test_trains_and_logs_copo_metrics(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    for key in ("copo/consistency_entropy", "copo/gate_mean", "copo/global_adv_std", "copo/extract_fallback_frac"):
        values = _logged(trainer, key)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
    # the pattern reward gives prompt rewards 1, 0, .75: std 0.52 every step
    assert _logged(trainer, "copo/global_adv_std") == pytest.approx([0.5204165] * 2, rel=1e-5)
    assert all(0 <= v <= 2 for v in _logged(trainer, "copo/consistency_entropy"))  # log2(4) bits at most
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert trainer.ref_model is None


def test_buffered_micro_batches_carry_copo_fields_row_by_row(tmp_path):
    """num_iterations=2 and 2 accumulation steps: TRL shuffles and splits the generation batch;
    every micro-batch row must keep its own local / global advantage and weight."""
    trainer = _trainer(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2, num_iterations=2,
                       max_steps=2, blend="soft-with-zero")
    generated, seen = [], []
    gen, loss = trainer._generate_and_score_completions, trainer._compute_loss

    def record_gen(inputs):
        out = gen(inputs)
        generated.append({k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim > 0})
        return out

    def record_loss(model, inputs):
        seen.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.ndim > 0})
        return loss(model, inputs)

    trainer._generate_and_score_completions, trainer._compute_loss = record_gen, record_loss
    trainer.train()
    assert len(generated) == 1 and len(seen) == 4  # one generation feeds 2 iterations x 2 micro-batches
    full = generated[0]
    assert "old_per_token_logps" in full  # off-policy micro-batches get the old log-probs

    def row_key(b, i):
        return (tuple(b["prompt_ids"][i].tolist()), tuple(b["completion_ids"][i].tolist()))

    fields = ("advantages", "copo_global_advantages", "copo_local_weight")
    for micro in seen:
        assert micro["completion_ids"].size(0) == 6
        for i in range(6):
            matches = [j for j in range(12) if row_key(full, j) == row_key(micro, i)
                       and all(math.isclose(full[f][j].item(), micro[f][i].item(), abs_tol=1e-7) for f in fields)]
            assert matches, f"row {i} lost its COPO fields"


def test_lora_with_kl_and_gradient_checkpointing(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # beta > 0: the reference is the base model (adapter disabled), the k3 KL enters the loss
    trainer = _trainer(tmp_path, peft_config=lora, max_steps=2, beta=0.001, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert len(_logged(trainer, "copo/gate_mean")) == 2
    kl = _logged(trainer, "kl")
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] > 0  # LoRA B starts at 0
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(before[n], after[n]) for n in before)


# ----------------------------------------------------------------------------- config
def test_defaults(tmp_path):
    cfg = COPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (cfg.gate_k, cfg.gate_b, cfg.blend, cfg.entropy_reward_coef) == (5.0, 1.0, "only-soft", False)
    assert (cfg.epsilon, cfg.dual_clip, cfg.beta, cfg.loss_type) == (0.2, 3.0, 0.0, "grpo")
    assert cfg.answer_extractor == "grouprl_core.answers.final_answer"


def test_callable_extractor_is_accepted_and_serialised(tmp_path):
    cfg = COPOConfig(output_dir=str(tmp_path), use_cpu=True, answer_extractor=toy_extract_answer)
    assert cfg.to_dict()["answer_extractor"] == "grouprl_trl.tiny.toy_extract_answer"
    assert '"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"' in cfg.to_json_string()


@pytest.mark.parametrize(
    "overrides, field_name",
    [
        ({"blend": "soft"}, "blend"),
        ({"gate_k": float("nan")}, "gate_k"),
        ({"gate_b": "one"}, "gate_b"),
        ({"entropy_reward_coef": 0.5}, "entropy_reward_coef"),
        ({"answer_extractor": "no_such_module.extract"}, "answer_extractor"),
        ({"answer_extractor": "extract"}, "answer_extractor"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"loss_type": "dapo"}, "loss_type"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, "multi_objective_aggregation"),
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
    ],
)
def test_bad_config_names_the_field(tmp_path, overrides, field_name):
    with pytest.raises(ValueError, match=field_name):
        COPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_unscored_completion_is_a_clear_error(tmp_path):
    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    trainer = _trainer(tmp_path, reward=none_reward)
    with pytest.raises(ValueError, match="finite reward"):
        trainer._generate_and_score_completions(_rows(trainer))


def test_yaml_through_trlparser(tmp_path):
    from trl import ModelConfig, TrlParser

    path = tmp_path / "copo.yaml"
    path.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path}
        model_name_or_path: tiny
        gate_k: 20
        gate_b: 1.5
        blend: soft-with-zero
        entropy_reward_coef: true
        answer_extractor: {EXTRACTOR}
        dual_clip: 2.5
        beta: 0.001
        use_cpu: true
    """))
    cfg, model_cfg = TrlParser((COPOConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(path), "--gate_k", "10"]
    )
    assert isinstance(cfg, COPOConfig) and model_cfg.model_name_or_path == "tiny"
    assert (cfg.gate_k, cfg.gate_b, cfg.blend, cfg.entropy_reward_coef) == (10.0, 1.5, "soft-with-zero", True)
    assert (cfg.answer_extractor, cfg.dual_clip, cfg.beta) == (EXTRACTOR, 2.5, 0.001)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nblend: sometimes\n")
    with pytest.raises(ValueError, match="blend"):
        TrlParser((COPOConfig,)).parse_args_and_config(["--config", str(bad)])
