"""GCPO-gold over two gloo processes: rank 0 holds two all-wrong groups, rank 1 none.

Per-process metrics would read injected_frac 1.0 / 0.0; the global ones read 2 / 4 groups. With
"append" rank 0 gets 2 gold rows and rank 1 two filler rows (loss mask 0, advantage 0), so both
hold 10 rows as TRL's per-row gathers need, and every real row's advantage equals the
single-process hand value."""

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from test_gcpo_trainer import GOLD_REWARD, ROWS, group_adv

BY_PROMPT = {row["prompt"]: row for row in ROWS}
RANK_PROMPTS = {0: ["qc:", "qc:"], 1: ["qa:", "qb:"]}  # two groups of 4 per process


def _worker(rank, port, out_dir):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from test_gcpo_trainer import make_trainer

    inputs = [dict(BY_PROMPT[p]) for p in RANK_PROMPTS[rank] for _ in range(4)]
    results = {}
    for placement in ("replace", "append"):
        out = os.path.join(out_dir, placement)
        trainer, _ = make_trainer(out, per_device_train_batch_size=8, gold_placement=placement)
        assert trainer.accelerator.num_processes == 2
        batch = trainer._generate_and_score_completions([dict(x) for x in inputs])
        m = trainer._metrics["train"]
        results[placement] = {
            "advantages": batch["advantages"].tolist(),
            "rows": batch["completion_ids"].size(0),
            "injected": m["gold/injected_frac"],
            "gold_reward": m["gold/reward_mean"],
            "num_items": int(batch["num_items_in_batch"]),
            "local_tokens": int(batch["completion_mask"].sum()),
            "row_tokens": batch["completion_mask"].sum(-1).tolist(),
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gold_metrics_are_global():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(_free_port(), d), nprocs=2, join=True, start_method="spawn")
        results = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    c_replace = group_adv([0, 0, 0, GOLD_REWARD])
    c_append = group_adv([0, 0, 0, 0, GOLD_REWARD])
    a_then_b = group_adv([1, 0, 0, 0]) + [0.0] * 4
    expected = {
        "replace": [c_replace * 2, a_then_b],
        "append": [c_append[:4] * 2 + c_append[4:] * 2, a_then_b + [0.0, 0.0]],
    }
    for placement, rows in (("replace", (8, 8)), ("append", (10, 10))):
        for rank in range(2):
            res = results[rank][placement]
            assert res["rows"] == rows[rank]
            assert res["injected"] == [0.5]  # 2 of the 4 groups in the global batch
            assert res["gold_reward"] == [GOLD_REWARD]
            pairs = zip(res["advantages"], expected[placement][rank], strict=True)
            assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in pairs)
        if placement == "append":  # rank 1's two extra rows are fillers without a loss token
            assert results[1][placement]["row_tokens"][8:] == [0, 0]
            assert all(t > 0 for t in results[0][placement]["row_tokens"])
        # the token count of the loss normaliser is global, on the process without gold rows too
        total = sum(results[r][placement]["local_tokens"] for r in range(2))
        assert [results[r][placement]["num_items"] for r in range(2)] == [total, total]


# ----------------------------------------------------------------------------- "append" training on 2 processes
# Scripted completions (no sampling noise) and a reward by prompt digit and position: even digits 0, 2, 4 are
# all wrong (they get a gold member), 6 all right, odd digits alternate. Batch 1 puts the two all-wrong groups
# on process 0 (2 gold rows there, 2 fillers on process 1), batch 2 one (1 gold row, 1 filler).
APPEND_DIGITS = [0, 2, 1, 3, 4, 6, 5, 7]
GROUP = 4


def append_reward(prompts, completions, solution, **kwargs):
    out = []
    for i, (p, c, s) in enumerate(zip(prompts, completions, solution, strict=True)):
        digit = int(p[1])
        if c.startswith("zq"):
            out.append(float(c == "zq" + s))
        elif digit in (0, 2, 4):
            out.append(0.0)
        elif digit == 6:
            out.append(1.0)
        else:
            out.append(float(i % 2 == 0))
    return out


def _train_append(out_dir: str, per_device_rows: int, capture: list | None = None, max_steps: int = 2) -> dict:
    from datasets import Dataset
    from test_distributed_trainers import ScriptedGeneration

    from grouprl_trl import GCPOConfig, GCPOTrainer
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    args = GCPOConfig(
        output_dir=out_dir, use_cpu=True, report_to="none", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=per_device_rows, num_generations=GROUP, max_completion_length=4,
        max_steps=max_steps,
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, optim="sgd", learning_rate=0.5,
        max_grad_norm=0.0, shuffle_dataset=False, gold_placement="append", gold_template="zq{solution}",
        importance_sampling_level="token", epsilon=0.2,
    )
    cls = type("ScriptedGCPOTrainer", (ScriptedGeneration, GCPOTrainer), {})
    data = Dataset.from_list([{"prompt": f"q{d}:", "solution": str(d)} for d in APPEND_DIGITS])
    trainer = cls(model=build_tiny_model(tok, seed=0), reward_funcs=append_reward, args=args, train_dataset=data,
                  processing_class=tok)
    if capture is not None:
        generate = trainer._generate_and_score_completions

        def keep(inputs):
            batch = generate(inputs)
            capture.append({k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
            return batch

        trainer._generate_and_score_completions = keep
    tables = []
    log = trainer.log

    def log_and_keep_table(*a, **kw):
        tables.append([float(x) for x in trainer._logs["advantages"]])
        return log(*a, **kw)

    trainer.log = log_and_keep_table
    trainer.train()
    keys = ("loss", "gold/injected_frac", "gold/reward_mean", "gold/below_threshold_frac", "reward")
    history = trainer.state.log_history
    return {
        "log": {k: [h[k] for h in history if k in h] for k in keys},
        "tables": tables,
        "params": {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()},
    }


def _append_worker(rank, port, out_dir):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    torch.save(_train_append(out_dir, per_device_rows=8), os.path.join(out_dir, f"append{rank}.pt"))


def test_append_trains_on_two_processes_like_one(tmp_path):
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer

    captured = []
    single = _train_append(str(tmp_path / "single"), per_device_rows=16, capture=captured)
    out_dir = str(tmp_path / "ddp")
    os.makedirs(out_dir)
    mp.start_processes(_append_worker, args=(_free_port(), out_dir), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(os.path.join(out_dir, f"append{r}.pt"), weights_only=True) for r in range(2)]

    # 4 groups per batch: 2 then 1 all-wrong group gets its gold member, which scores 1
    assert single["log"]["gold/injected_frac"] == [0.5, 0.25]
    assert single["log"]["gold/reward_mean"] == [1.0, 1.0]
    assert single["log"]["gold/below_threshold_frac"] == [0.0, 0.0]
    assert [c["completion_ids"].size(0) for c in captured] == [18, 17]
    for res in results:
        for key, values in single["log"].items():
            assert res["log"][key] == pytest.approx(values, rel=1e-4, abs=1e-6), key
        # the completions table: each batch's rows (the last ones appended) with the same advantages, fillers
        # left out (the table also keeps older rows up to its size, which depend on the row order)
        for table, one, rows in zip(res["tables"][:2], single["tables"][:2], (18, 17), strict=True):
            assert sorted(table[-rows:]) == pytest.approx(sorted(one[-rows:]), abs=1e-5)
        for name, value in single["params"].items():
            torch.testing.assert_close(res["params"][name], value, rtol=1e-4, atol=1e-6)

    # one process, step 1, against a naive loss: -(1/N) sum_i A_i * mean_t ratio_it over all N = 18 sequences
    # (token ratio, on-policy: ratio = exp(logp - logp.detach()) = 1, no clip), one SGD step of lr 0.5
    batch = captured[0]
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    n_rows = batch["completion_ids"].size(0)
    loss = 0.0
    for i in range(n_rows):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
        completion = batch["completion_ids"][i][batch["completion_mask"][i].bool()]
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, prompt.numel() - 1 : -1]
        logp = torch.log_softmax(logits.float(), -1).gather(1, completion[:, None])[:, 0]
        ratio = torch.exp(logp - logp.detach())
        loss = loss - batch["advantages"][i] * ratio.mean() / n_rows
    loss.backward()
    moved = 0.0
    step1 = _train_append(str(tmp_path / "one_step"), per_device_rows=16, max_steps=1)["params"]
    for name, p in model.named_parameters():
        expected = start[name] - 0.5 * p.grad
        torch.testing.assert_close(step1[name], expected, rtol=1e-4, atol=1e-6)
        moved = max(moved, (expected - start[name]).abs().max().item())
    assert moved > 1e-4
