"""GPG's valid-group threshold across two gloo processes on CPU, with *uneven* valid groups per process.

The official GPG loop (research note on AMAP-ML/GPG's 7B trainer) counts valid groups with one global
running count over its resampling rounds, stops when that count reaches beta_th * N (N = groups of
one round, all processes), and lets each process keep its own valid groups oldest first, filled up
with its last round's zero-variance groups (surplus dropped); its alpha is 1 / min(1, count / N).
``valid_count="global"`` must reproduce that: the expected rounds, alpha and the groups each process
trains on are derived below by :func:`official_batches`, a naive re-derivation of those rules.

Setup: 2 processes x 2 groups of 4 per round (N = 4), beta_th 0.6, one micro-step per generation.
Completions are scripted ("<round letter><group><position>"), and the reward depends on the process
and the round, so each scenario fixes which groups are valid:

* A: every round p0 = [V, V], p1 = [I, I]. Official: stop after round 2 (count 2 + 2 >= 2.4),
  p0 trains on round 1, p1 on round 2's zero-variance groups, alpha 1. The capped count never sees
  more than 2 usable groups and runs to ``max_resample_rounds``.
* B: round 1 p0 = [V, V], p1 = [I, I]; round 2 p0 = [V, I], p1 = [V, I] (the short process catches up).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_trainer_kwargs

G = 4
GROUPS_PER_PROCESS = 2
THRESHOLD = 0.6
V, I = True, False
# scenario -> per round (0-based) -> per process -> validity of its groups
SCENARIOS = {
    "A": [[[V, V], [I, I]]] * 6,
    "B": [[[V, V], [I, I]], [[V, I], [V, I]]] + [[[I, I], [I, I]]] * 4,
}
ROUND_LETTERS = "abcdefgh"


def official_batches(pattern, num_processes: int, n: int, threshold: float):
    """The official loop, re-derived naively: rounds generated, alpha, and each process's (round, group) list."""
    total = num_processes * n
    count, buffers, r = 0, [[] for _ in range(num_processes)], 0
    while True:
        for p in range(num_processes):
            buffers[p] += [(r, k) for k, ok in enumerate(pattern[r][p]) if ok]
        count += sum(sum(pattern[r][p]) for p in range(num_processes))
        if count >= threshold * total:
            break
        r += 1
    batches = [(buffers[p] + [(r, k) for k, ok in enumerate(pattern[r][p]) if not ok])[:n]
               for p in range(num_processes)]
    return r + 1, 1.0 / min(1.0, count / total), batches


class ScriptedRounds:
    """Replaces the sampling in ``GRPOTrainer._generate_single_turn`` (TRL 1.14.2-1.16): the completion of
    local row j in this process's r-th generation call is ``<letter r><group j // G><position j % G>``."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        self.generation_calls = getattr(self, "generation_calls", 0) + 1
        letter = ROUND_LETTERS[self.generation_calls - 1]
        texts = [f"{letter}{j // G}{j % G}" for j in range(len(prompt_ids))]
        return [self._tokenizer.encode(t, add_special_tokens=False) for t in texts], None


def scripted_reward(pattern):
    def reward(completions, **kwargs):
        rank = torch.distributed.get_rank()
        out = []
        for c in completions:  # V group: 1, 0, 1, 0 by position; I group: all 0
            r, k, pos = ROUND_LETTERS.index(c[0]), int(c[1]), int(c[2])
            out.append(float(pattern[r][rank][k] and pos % 2 == 0))
        return out

    reward.__name__ = "scripted_reward"
    return reward


def _train(scenario: str, out_dir: str, **fields) -> dict:
    from grouprl_trl import GPGConfig, GPGTrainer
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

    tok = build_tokenizer()
    args = GPGConfig(**tiny_trainer_kwargs(out_dir, per_device_train_batch_size=GROUPS_PER_PROCESS * G,
                                           num_generations=G, max_steps=1, valid_threshold=THRESHOLD,
                                           carry_over=False, **fields))
    trainer_cls = type("ScriptedGPGTrainer", (ScriptedRounds, GPGTrainer), {})
    trainer = trainer_cls(model=build_tiny_model(tok, seed=0), reward_funcs=scripted_reward(SCENARIOS[scenario]),
                          args=args, train_dataset=build_toy_dataset(num_rows=64), processing_class=tok)
    trained = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *a, **kw):
        for ids, adv in zip(inputs["completion_ids"], inputs["advantages"], strict=True):
            text = tok.decode(ids, skip_special_tokens=True)
            trained.append((ROUND_LETTERS.index(text[0]), int(text[1]), int(text[2]), round(float(adv), 6)))
        return original(model, inputs, *a, **kw)

    trainer.compute_loss = compute_loss
    trainer.train()
    history = trainer.state.log_history
    return {
        "log": {k: [h[k] for h in history if k in h] for k in ("gpg/alpha", "gpg/resample_rounds", "gpg/valid_fraction")},
        "generation_calls": trainer.generation_calls,
        "trained": trained,
    }


RUNS = {  # name -> (scenario, extra config)
    "A_global": ("A", {"valid_count": "global"}),
    "B_global": ("B", {"valid_count": "global"}),
    "A_capped": ("A", {"valid_count": "capped", "max_resample_rounds": 3}),
}


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    results = {name: _train(scenario, os.path.join(out_dir, name), **fields)
               for name, (scenario, fields) in RUNS.items()}
    torch.save(results, os.path.join(out_dir, f"result{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("gpg_ddp"))
    mp.start_processes(_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"result{r}.pt"), weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", ["A_global", "B_global"])
def test_global_count_follows_the_official_loop(results, name):
    scenario = SCENARIOS[RUNS[name][0]]
    rounds, alpha, batches = official_batches(scenario, 2, GROUPS_PER_PROCESS, THRESHOLD)
    assert rounds == 2 and alpha == 1.0  # the hand-derived values of the research note (scenarios A and B)
    for rank, res in enumerate(results):
        run = res[name]
        assert run["generation_calls"] == rounds
        assert run["log"]["gpg/resample_rounds"] == [rounds - 1]
        assert run["log"]["gpg/alpha"] == [pytest.approx(alpha)]
        trained_groups = sorted({(r, k) for r, k, _, _ in run["trained"]})
        assert trained_groups == sorted(batches[rank]), rank
        assert len(run["trained"]) == GROUPS_PER_PROCESS * G
        for r, k, pos, adv in run["trained"]:  # alpha * (r - mean): +-0.5 in a valid group, 0 otherwise
            expected = alpha * ((pos % 2 == 0) - 0.5) if scenario[r][rank][k] else 0.0
            assert adv == pytest.approx(expected), (r, k, pos)


def test_capped_count_misses_the_global_threshold_and_runs_to_the_bound(results):
    # scenario A: p0's surplus is not counted, so the capped count stays 2 of 4 < 0.6 * 4 until the bound
    for res in results:
        run = res["A_capped"]
        assert run["log"]["gpg/resample_rounds"] == [3.0]
        assert run["generation_calls"] == 4
        assert run["log"]["gpg/alpha"] == [pytest.approx(16 / 8)]  # B / (B - M) of the assembled batch
