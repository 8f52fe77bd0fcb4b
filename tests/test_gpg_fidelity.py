"""GPGTrainer's fidelity switches and signals through TRL's own ``train()`` (TRL 1.14.2-1.16, CPU):

* the logged batch metrics (``reward``, ``reward_std``, ``rewards/<f>/*``, ``frac_reward_zero_std``,
  ``completions/*``) describe the rows the update used, recomputed here from those rows; every round's
  numbers are under ``gpg/all_rounds/*``;
* ``loss_normalization="per_device"`` vs ``"global"``: the loss of each micro-batch against a token
  mean recomputed from TRL's own log-probs;
* ``resample_strategy``: the size of each generation round (counted at TRL's generation call);
* a ``gpg_state_rank0.pt`` that is not a GPG state names the file.

Completions are scripted: row j of the r-th generation call is ``<letter r><group j // 4><position j % 4>``
(plus "z" in the first call, and the eos token at position 3), and the reward of a row is known from its
text: ``PATTERN[r][group]`` says whether the group is valid (1, 0, 1, 0 by position) or all 0.
"""

from __future__ import annotations


import pytest
import torch
from conftest import tiny_trainer_kwargs

from grouprl_trl import GPGConfig, GPGTrainer
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

G = 4
LETTERS = "abcdefghij"
V, I = True, False


class Scripted:
    """Replaces the sampling in ``GRPOTrainer._generate_single_turn`` (TRL 1.14.2-1.16) by scripted completions
    and records how many rows each generation call got."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self.round_rows = getattr(self, "round_rows", []) + [len(prompt_ids)]
        r = len(self.round_rows) - 1
        out = []
        for j in range(len(prompt_ids)):
            text = f"{LETTERS[r]}{j // G}{j % G}" + ("z" if r == 0 else "")
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            out.append(ids + [self._tokenizer.eos_token_id] if j % G == 3 else ids)
        return out, None


def parse(text: str) -> tuple[int, int, int]:
    return LETTERS.index(text[0]), int(text[1]), int(text[2])


def pattern_reward(pattern):
    def scripted_reward(completions, **kwargs):
        out = []
        for c in completions:
            r, k, pos = parse(c)
            out.append(float(pattern[r][k] and pos % 2 == 0))
        return out

    return scripted_reward


def reward_of(pattern, text: str) -> float:
    r, k, pos = parse(text)
    return float(pattern[r][k] and pos % 2 == 0)


def make_trainer(tmp_path, pattern, **fields):
    tok = build_tokenizer()
    fields = {"per_device_train_batch_size": 4 * G, "max_completion_length": 5, **fields}
    args = GPGConfig(**tiny_trainer_kwargs(tmp_path, **fields))
    cls = type("ScriptedGPG", (Scripted, GPGTrainer), {})
    return cls(model=build_tiny_model(tok), reward_funcs=pattern_reward(pattern), args=args,
               train_dataset=build_toy_dataset(num_rows=64), processing_class=tok), tok


def record_trained_rows(trainer, tok):
    """(step, completion text, token count incl. eos, truncated?) of every row compute_loss receives."""
    rows = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        for ids, mask in zip(inputs["completion_ids"], inputs["completion_mask"], strict=True):
            n = int(mask.sum())
            rows.append((trainer.state.global_step, tok.decode(ids, skip_special_tokens=True), n,
                         int(ids[n - 1]) != tok.eos_token_id))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return rows


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def naive_std(values):
    m = sum(values) / len(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5


# ----------------------------------------------------------------------------- metrics of the trained batch
# step 1: round a has 1 valid group of 4 (1 / 4 < 0.5), round b 4 valid -> batch a0, b0, b1, b2; b3 carried.
# step 2: round c all zero-variance (count 1 with the carried group), round d 4 valid -> batch b3, d0, d1, d2:
# round c is discarded entirely, and a carried group is trained on.
DISCARD = [[V, I, I, I], [V, V, V, V], [I, I, I, I], [V, V, V, V]]


def test_logged_batch_metrics_describe_the_trained_rows(tmp_path):
    trainer, tok = make_trainer(tmp_path, DISCARD, max_steps=2, valid_threshold=0.5)
    rows = record_trained_rows(trainer, tok)
    trainer.train()
    assert trainer.round_rows == [16, 16, 16, 16]
    by_step = [[r for r in rows if r[0] == step] for step in (0, 1)]
    assert sorted(parse(t)[:2] for _, t, _, _ in by_step[0])[::G] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert sorted(parse(t)[:2] for _, t, _, _ in by_step[1])[::G] == [(1, 3), (3, 0), (3, 1), (3, 2)]
    for step, trained in enumerate(by_step):
        rewards = [reward_of(DISCARD, t) for _, t, _, _ in trained]
        lengths = [n for _, _, n, _ in trained]
        terminated = [n for _, _, n, cut in trained if not cut]
        groups = {}
        for (_, t, _, _), r in zip(trained, rewards):
            groups.setdefault(parse(t)[:2], []).append(r)
        expected = {
            "reward": sum(rewards) / len(rewards),
            "reward_std": naive_std(rewards),
            "rewards/scripted_reward/mean": sum(rewards) / len(rewards),
            "rewards/scripted_reward/std": naive_std(rewards),
            "frac_reward_zero_std": sum(max(v) == min(v) for v in groups.values()) / len(groups),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(cut for *_, cut in trained) / len(trained),
            "completions/mean_terminated_length": sum(terminated) / len(terminated),
            "completions/max_terminated_length": max(terminated),
        }
        log = trainer.state.log_history[step]
        for key, value in expected.items():
            assert log[key] == pytest.approx(value), (step, key)
        assert log["gpg/valid_fraction"] == 1.0
    # every generated completion of the step (both rounds), independent of which were trained
    all_rounds = [[reward_of(DISCARD, f"{LETTERS[r]}{j // G}{j % G}") for r in rounds for j in range(16)]
                  for rounds in ((0, 1), (2, 3))]
    assert logged(trainer, "gpg/all_rounds/reward") == pytest.approx([sum(v) / len(v) for v in all_rounds])
    assert logged(trainer, "gpg/all_rounds/reward_std") == pytest.approx([naive_std(v) for v in all_rounds])
    # the first round of step 1 carries 4 tokens per row (3 + "z"; +eos at position 3), later rounds 3
    assert logged(trainer, "gpg/all_rounds/completions/mean_length") == pytest.approx([(4.25 + 3.25) / 2, 3.25])
    assert logged(trainer, "reward") != logged(trainer, "gpg/all_rounds/reward")  # the case the fix is about
    assert logged(trainer, "gpg/generated_prompts") == [8.0, 8.0]


def test_without_resampling_trl_metrics_are_kept(tmp_path):
    trainer, tok = make_trainer(tmp_path, [[V, I, V, I]] * 2, max_steps=1, valid_threshold=0.5)
    rows = record_trained_rows(trainer, tok)
    trainer.train()
    assert trainer.round_rows == [16]
    rewards = [reward_of([[V, I, V, I]], t) for _, t, _, _ in rows]
    log = trainer.state.log_history[0]
    assert log["reward"] == pytest.approx(sum(rewards) / 16) == log["gpg/all_rounds/reward"]
    assert log["frac_reward_zero_std"] == 0.5


# ----------------------------------------------------------------------------- loss normalisation
def test_per_device_and_global_normalisation_on_the_hand_example(tmp_path):
    """The research note's example (2 processes, K = 1, alpha 1): process 0 has lengths 3 and 1 with per-token
    values +1 and -1, process 1 lengths 1 and 5 with +2 and -2. Per device: mean of 0.5 and -4/3 = -0.41667
    (DDP averages the two); global: (3 - 1 + 2 - 10) / 10 = -0.6 (the pieces are summed over the 10 tokens)."""
    pieces = []
    for lengths, values in (((3, 1), (1.0, -1.0)), ((1, 5), (2.0, -2.0))):
        mask = torch.zeros(2, 5)
        loss = torch.zeros(2, 5)
        for i, (n, v) in enumerate(zip(lengths, values)):
            mask[i, :n] = 1
            loss[i, :n] = v
        pieces.append((loss, mask))
    results = {}
    for mode in ("per_device", "global"):
        trainer, _ = make_trainer(tmp_path / mode, DISCARD, loss_normalization=mode, valid_threshold=0.0)
        trainer.model.eval()  # no gradient accumulation; one process stands for each of the two
        inputs = {"num_items_in_batch": torch.tensor(10)}
        results[mode] = [float(trainer.aggregate_loss(l, m, inputs, "token-mean")) for l, m in pieces]
    assert sum(results["per_device"]) / 2 == pytest.approx(-0.416667, abs=1e-6)
    assert sum(results["global"]) == pytest.approx(-0.6)


@pytest.mark.parametrize("mode", ["per_device", "global"])
def test_loss_normalisation_through_train(tmp_path, mode):
    # 2 micro-batches of 8 rows per generation batch: per_device divides each by its own token count
    trainer, tok = make_trainer(tmp_path, [[V, V, V, V]] * 4, max_steps=2, valid_threshold=0.0,
                                per_device_train_batch_size=8, gradient_accumulation_steps=2,
                                loss_normalization=mode)
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        loss = original(model, inputs, *args, **kwargs)
        with torch.no_grad():  # TRL's own log-probs of the same rows
            logps = trainer._get_per_token_logps_and_entropies(
                model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].size(1))[0]
        mask = inputs["completion_mask"].float()
        total = -(logps * inputs["advantages"].unsqueeze(1) * mask).sum()
        ga = trainer.current_gradient_accumulation_steps
        per_device = total / mask.sum() / ga
        global_ = total / (inputs["num_items_in_batch"] * ga / trainer.args.steps_per_generation)
        seen.append((float(loss.detach()), float(per_device), float(global_)))
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()
    assert len(seen) == 4
    assert any(abs(p - g) > 1e-4 for _, p, g in seen)  # the micro-batches hold different token counts
    for loss, per_device, global_ in seen:
        assert loss == pytest.approx(per_device if mode == "per_device" else global_, rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- resample strategies
@pytest.mark.parametrize(
    "strategy,pattern,expected_rows,expected_prompts,expected_groups",
    [
        # round a: 2 valid of 4, beta_th 0.75 needs 3: one more group is missing
        ("full_rounds", [[V, V, I, I], [V, V, V, V]], [16, 16], [8], [(0, 0), (0, 1), (1, 0), (1, 1)]),
        ("missing_only", [[V, V, I, I], [V]], [16, 4], [5], [(0, 0), (0, 1), (1, 0), (0, 2)]),
        # expected: 1 valid of 4 (rate 1/4), 2 missing -> 8 groups, capped at 4; b3 is carried, and
        # step 2 generates only 3 groups because the carried one stands in for a fresh prompt
        ("expected", [[V, I, I, I], [V, V, V, V], [V, V, V]], [16, 16, 12], [8, 3],
         [(0, 0), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2)]),
    ],
)
def test_resample_strategy_sizes_each_round(tmp_path, strategy, pattern, expected_rows, expected_prompts,
                                            expected_groups):
    steps = len(expected_prompts)
    trainer, tok = make_trainer(tmp_path, pattern, max_steps=steps, valid_threshold=0.75,
                                resample_strategy=strategy)
    rows = record_trained_rows(trainer, tok)
    trainer.train()
    assert trainer.round_rows == expected_rows  # rows handed to TRL's generation, round by round
    assert logged(trainer, "gpg/generated_prompts") == expected_prompts
    assert sorted({parse(t)[:2] for _, t, _, _ in rows}) == sorted(expected_groups)
    assert len(rows) == 16 * steps  # every batch keeps TRL's row count


def test_strategy_and_normalisation_fields_are_checked(tmp_path):
    for field, value in (("valid_count", "official"), ("resample_strategy", "half"), ("loss_normalization", "dp")):
        with pytest.raises(ValueError, match=field):
            GPGConfig(**tiny_trainer_kwargs(tmp_path, **{field: value}))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GPGConfig(**tiny_trainer_kwargs(tmp_path, loss_normalization="per_device", loss_agg_mode="seq-mean-token-mean"))
