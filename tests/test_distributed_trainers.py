"""GPGTrainer and GuidanceGCPOTrainer in two gloo processes on CPU agree with one process.

Setup that makes the comparison exact: scripted completions (a function of the prompt and
the position in the group, of unequal lengths, so that the token-mean normaliser matters;
sampling would differ between one and two processes), the same seeded model, no dataset
shuffling, plain SGD, and a reward that depends only on the prompt and the position. The global batch is 4 groups of 4; with 2 processes each
holds 2 groups. The data puts both zero-variance groups on process 0 and both valid groups on
process 1 (an uneven split): a per-process alpha would be 0 (skip) on one and 1 on the other,
the global one is 16 / (16 - 8) = 2.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_trainer_kwargs

# dataset order = batch order (no shuffling): digits 0, 2 (zero-variance) then 1, 3 (valid), twice
DIGITS = [0, 2, 1, 3, 4, 6, 5, 7]
GROUP = 4


def parity_reward(prompts, completions, **kwargs):
    """Even prompt digit: 0.0 for the whole group. Odd: 1, 0, 1, 0 by position (every group of 4 valid)."""
    return [float(int(p[1]) % 2 == 1 and i % 2 == 0) for i, p in enumerate(prompts)]


class ScriptedGeneration:
    """Replaces the sampling in ``GRPOTrainer._generate_single_turn`` (TRL 1.16) by fixed completions."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        completions = []
        for j, ids in enumerate(prompt_ids):  # local rows: whole groups, in order
            digit, pos = int(self._tokenizer.decode(ids, skip_special_tokens=True)[1]), j % GROUP
            text = ("ab"[pos % 2] + str((digit + pos) % 10) + "cdef"[pos])[: 1 + (digit + pos) % 3]
            completions.append(self._tokenizer.encode(text, add_special_tokens=False))
        return completions, None


def _train(algo: str, out_dir: str, per_device_rows: int) -> dict:
    from datasets import Dataset

    from grouprl_trl import GPGConfig, GPGTrainer, GuidanceGCPOConfig, GuidanceGCPOTrainer
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer

    trainer_cls, config_cls, extra = {
        "gpg": (GPGTrainer, GPGConfig, {"valid_threshold": 0.0}),
        # the dynamic filter is off so that the zero-variance groups stay in the batch
        # (credit maps: the page of step 2 gathers the rows of both processes)
        "guidance": (GuidanceGCPOTrainer, GuidanceGCPOConfig, {"dynamic_filter": False, "credit_map_every": 2}),
    }[algo]
    trainer_cls = type(f"Scripted{trainer_cls.__name__}", (ScriptedGeneration, trainer_cls), {})
    tok = build_tokenizer()
    args = config_cls(**tiny_trainer_kwargs(
        out_dir, per_device_train_batch_size=per_device_rows, num_generations=GROUP, max_steps=2,
        # plain SGD: the update is linear in the gradient, so a wrong gradient scale shows up
        # (AdamW would hide it and amplify float noise on near-zero gradients)
        optim="sgd", learning_rate=0.5, shuffle_dataset=False, **extra))
    data = Dataset.from_list([{"prompt": f"q{d}:"} for d in DIGITS])
    trainer = trainer_cls(model=build_tiny_model(tok, seed=0), reward_funcs=parity_reward, args=args,
                          train_dataset=data, processing_class=tok)
    trainer.train()
    history = trainer.state.log_history
    return {
        "log": {k: [h[k] for h in history if k in h] for k in ("loss", "gpg/alpha", "gpg/valid_fraction", "reward")},
        "params": {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()},
    }


def _initial_params() -> dict:
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer

    return {n: p.detach().clone() for n, p in build_tiny_model(build_tokenizer(), seed=0).named_parameters()}


def _worker(rank: int, world: int, port: int, algo: str, out_dir: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    result = _train(algo, out_dir, per_device_rows=16 // world)
    torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("algo", ["gpg", "guidance"])
def test_two_processes_match_one_process(tmp_path, algo):
    single = _train(algo, str(tmp_path / "single"), per_device_rows=16)
    out_dir = str(tmp_path / "ddp")
    os.makedirs(out_dir)
    mp.start_processes(_worker, args=(2, _free_port(), algo, out_dir), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(os.path.join(out_dir, f"result{r}.pt"), weights_only=True) for r in range(2)]

    if algo == "gpg":
        # step 1: digits 0, 2 zero-variance, 1, 3 valid -> M = 8 of B = 16; the same at step 2
        assert single["log"]["gpg/alpha"] == [2.0, 2.0]
        assert single["log"]["gpg/valid_fraction"] == [0.5, 0.5]
    moved = max((single["params"][n] - p).abs().max().item() for n, p in _initial_params().items())
    assert moved > 1e-4  # the updates are large enough for the comparison below to mean something
    for res in results:
        for key in ("gpg/alpha", "gpg/valid_fraction", "reward"):
            assert res["log"][key] == single["log"][key], key
        # token-mean over the global batch: the mean of the per-process losses equals the one-process loss
        assert res["log"]["loss"] == pytest.approx(single["log"]["loss"], rel=1e-4, abs=1e-6)
        for name, value in single["params"].items():  # DDP-averaged gradients = one-process gradients
            torch.testing.assert_close(res["params"][name], value, rtol=1e-4, atol=1e-6)
    assert single["log"]["loss"][0] != 0.0  # a real update happened (not two skipped steps)
    if algo == "guidance":  # one page per run, written once (main process), with the rows of both processes
        for run in (tmp_path / "single", tmp_path / "ddp"):
            assert sorted(p.name for p in (run / "credit_maps").iterdir()) == ["step_000002.html"]
            assert "Step 2: 16 completions in 4 groups" in (run / "credit_maps" / "step_000002.html").read_text()
