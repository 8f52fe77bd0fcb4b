"""GPU step cost: step time and peak memory of every trainer on Qwen2.5-Math-1.5B / -7B shapes.

    python -m bench.gpu_step                         # on one GPU: both shapes, budget 420 s (bench/gpu_run.sh)
    python -m bench.gpu_step --tiny                  # CPU, tiny shapes (what CI runs, tests/test_bench_gpu_script.py)
    python -m bench.gpu_step --sizes 1.5b --algos grpo,gpg --steps 2

The GPU machine has torch but no hub access and no vLLM, so the models are randomly initialised
from the architecture values of the released checkpoints' ``config.json`` (Qwen/Qwen2.5-Math-1.5B and
Qwen/Qwen2.5-Math-7B on the Hugging Face hub, see :data:`QWEN25_MATH`), in bf16 (weights, gradients
and AdamW states; one GPU, no FSDP), with gradient checkpointing as RL recipes use. Generation is
TRL's HF ``generate`` path. Every completion is exactly ``--completion-length`` tokens
(``min_new_tokens``) after a ``--prompt-length``-token prompt, G = 8 completions per prompt,
``--rows`` completions per optimizer step, the same for every algorithm.

Tokenizer: the character-level tokenizer of ``grouprl_trl.tiny`` (so nothing is downloaded), its
vocabulary padded with placeholder tokens up to the model's vocabulary size, so that every id a
random model samples decodes (the real Qwen tokenizer is not needed for a cost measurement).

Rewards (as ``bench.step_cost``): 0/1 alternating for every algorithm but GCPO-gold, so each group
has non-equal rewards (GPG never regenerates, GCPO-guidance's filter keeps every group); GCPO-gold
gets the toy task's reward, which a random model never earns: every group gets a gold completion,
its worst case.

Measured per (shape, algorithm), each in a fresh trainer and model in this process: the time of
each optimizer step (``on_step_end`` to ``on_step_end``, the first from its ``on_step_begin``; CUDA
synchronised), the generation time
inside it (TRL's ``_generate_single_turn``, timed and counted), the rest of the step (scoring,
log-prob passes, forward/backward, optimizer), and the peak of ``torch.cuda.max_memory_allocated``
over training (CPU: the process's peak RSS). The first ``--warmup`` steps are not timed. Ratios
are against GRPO (TRL, beta 0). An out-of-memory error or any other failure is recorded for that
row and the next row runs.

Time budget: the run plans against ``--budget-s``: before each row it estimates the row's time from
the steps measured so far (for a shape not yet measured: the previous shape's step time x 1.5) and
skips rows that would not fit, in priority order (the 7B shape gets what the 1.5B shape left). It
prints and records what it ran and what it skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.registry import ALGORITHMS, AlgorithmUnavailable, load, parse_algos

# Architecture values of the released checkpoints' config.json files on the Hugging Face hub
# (Qwen/Qwen2.5-Math-1.5B and Qwen/Qwen2.5-Math-7B; both Qwen2ForCausalLM, silu, rms_norm_eps 1e-6,
# no sliding window). Note the 7B's vocabulary is 152064, the 1.5B's 151936.
QWEN25_MATH = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, rope_theta=10000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=4096, rope_theta=10000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=False),
}
# --tiny: grouprl_trl.tiny's CPU test model (its own 42-token vocabulary)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=None, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)

DEFAULT_ALGOS = ["grpo", "grpo_kl", "gpg", "copo", "gcpo_gold", "guidance"]
# the 7B shape gets the time the 1.5B shape left, in this order
PRIORITY_7B = ["grpo", "gpg", "grpo_kl", "copo", "gcpo_gold", "guidance"]
REFERENCE = "grpo"
GROUP_SIZE = 8
UNKNOWN_SHAPE_FACTOR = 1.5  # a not-yet-measured shape's step time vs the previous shape's
SETUP_S = {"tiny": 2.0, "1.5b": 15.0, "7b": 45.0}  # model build (+ save for beta > 0) and trainer setup, a guess


def wide_tokenizer(vocab_size: int | None):
    """grouprl_trl.tiny's character tokenizer, its vocabulary padded to ``vocab_size`` ids (placeholders)."""
    from grouprl_trl.tiny import build_tokenizer

    base = build_tokenizer()
    if vocab_size is None or vocab_size <= len(base):
        return base
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = base.get_vocab()
    vocab.update({f"<|x{i}|>": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=base.unk_token))
    backend.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    backend.decoder = base.backend_tokenizer.decoder
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=base.pad_token, eos_token=base.eos_token,
                                  bos_token=base.bos_token, unk_token=base.unk_token, padding_side="left")
    tok.chat_template = base.chat_template
    return tok


def build_model(shape: dict, tokenizer, device: str, dtype, seed: int = 0):
    """A randomly initialised Qwen2ForCausalLM of the given shape, built directly on ``device``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    values = dict(shape)
    values["vocab_size"] = values["vocab_size"] or len(tokenizer)
    config = Qwen2Config(**values, hidden_act="silu", use_sliding_window=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_dataset(num_rows: int, prompt_length: int, tokenizer, seed: int = 0):
    """The toy task's rows (``prompt``, ``solution``), each prompt left-filled to ``prompt_length`` tokens."""
    from datasets import Dataset

    from grouprl_trl.tiny import build_toy_dataset

    rng = random.Random(seed)
    rows = []
    for row in build_toy_dataset(num_rows=num_rows, seed=seed):
        filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt_length - len(row["prompt"])))
        rows.append({"prompt": filler + row["prompt"], "solution": row["solution"]})
    lengths = {len(tokenizer(r["prompt"])["input_ids"]) for r in rows[:8]}
    if lengths != {prompt_length}:
        raise RuntimeError(f"prompts tokenise to {lengths} tokens, expected {prompt_length}")
    return Dataset.from_list(rows)


def run_row(size: str, algo: str, args, tmp: Path, saved: dict, warmup: int) -> dict:
    """Train one algorithm for warmup + steps optimizer steps; step times, generation times, peak memory."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from bench.step_cost import alternating_reward
    from grouprl_trl._compat import wrap_rollouts
    from grouprl_trl.tiny import toy_reward

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    trainer_cls, config_cls, fields = load(algo)
    shape = TINY if size == "tiny" else QWEN25_MATH[size]
    tokenizer = wide_tokenizer(shape["vocab_size"])
    model = build_model(shape, tokenizer, args.device, dtype)
    if fields.get("beta", 0.0) > 0:
        # TRL builds the reference model from the policy's name_or_path: save the (same-seed) weights once
        if size not in saved:
            saved[size] = tmp / f"qwen25-math-{size}-random"
            model.save_pretrained(saved[size])
        model.config._name_or_path = str(saved[size])
    config = config_cls(
        output_dir=str(tmp / f"{size}-{algo}"),
        use_cpu=not cuda,
        report_to="none",
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=args.rows,
        num_generations=GROUP_SIZE,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        learning_rate=1e-6,
        max_steps=warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **fields,
    )

    def sync():
        if cuda:
            torch.cuda.synchronize()

    begins: list[float] = []
    ends: list[float] = []
    generations: list[tuple[int, float, int]] = []  # (optimizer step, seconds, completions)
    logged: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            sync()
            begins.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kwargs):
            sync()
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:  # the per-step logs, not the end-of-training summary
                logged.append(dict(logs))

    trainer = trainer_cls(model=model, reward_funcs=toy_reward if algo == "gcpo_gold" else alternating_reward,
                          args=config, processing_class=tokenizer, callbacks=[StepClock()],
                          train_dataset=build_dataset(args.rows * (warmup + args.steps) * 4, args.prompt_length,
                                                      tokenizer))
    trainer.remove_callback(PrinterCallback)

    def timed(generate):  # every rollout (GPG's extra rounds too) passes here
        def timed_generate(*a, **kw):
            sync()
            start = time.perf_counter()
            out = generate(*a, **kw)
            sync()
            generations.append((len(ends), time.perf_counter() - start, len(out[0])))
            return out

        return timed_generate

    wrap_rollouts(trainer, timed)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = (common.rss_mb() or 0) * 2**20
        common.reset_peak_rss()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else (common.rss_mb("VmHWM") or 0) * 2**20
    # step k: from the end of step k - 1 (step 0: its begin, after train()'s own setup) to its end
    steps = [b - a for a, b in zip(begins[:1] + ends[:-1], ends)]
    gen_per_step = [sum(s for i, s, _ in generations if i == k) for k in range(len(steps))]
    completions = [sum(n for i, _, n in generations if i == k) for k in range(len(steps))]
    timed = range(warmup, len(steps))
    result = {
        "size": size, "algo": algo, "status": "ok",
        "step_times_s": steps, "generation_s": gen_per_step, "completions_generated": completions,
        "warmup_steps": warmup, "timed_steps": len(timed),
        "step_s": statistics.median(steps[k] for k in timed),
        "generation_step_s": statistics.median(gen_per_step[k] for k in timed),
        "rest_of_step_s": statistics.median(steps[k] - gen_per_step[k] for k in timed),
        "completions_per_step": statistics.fmean(completions[k] for k in timed),
        "peak_memory_gib": peak / 2**30,
        "memory_before_train_gib": before / 2**30,
        "last_log": logged[-1] if logged else {},
    }
    del trainer, model
    return result


def cleanup():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_estimate(size: str, args, measured: dict, order: list[str], warmup: int) -> float:
    """Seconds a row of ``size`` is expected to take (steps x step time + setup)."""
    steps = warmup + args.steps
    if measured.get(size):
        per_step = max(measured[size])
    else:
        earlier = [max(measured[s]) for s in order[: order.index(size)] if measured.get(s)]
        per_step = earlier[-1] * UNKNOWN_SHAPE_FACTOR if earlier else args.first_step_guess_s
    return steps * per_step + SETUP_S.get(size, 30.0)


def summarise(results: list[dict]) -> list[dict]:
    by_key = {(r["size"], r["algo"]): r for r in results}
    for r in results:
        ref = by_key.get((r["size"], REFERENCE))
        if r["status"] == "ok" and ref and ref["status"] == "ok":
            r["step_vs_grpo"] = r["step_s"] / ref["step_s"]
            r["rest_vs_grpo"] = r["rest_of_step_s"] / ref["rest_of_step_s"] if ref["rest_of_step_s"] > 0 else None
            r["memory_vs_grpo"] = r["peak_memory_gib"] / ref["peak_memory_gib"]
    return results


def format_table(results: list[dict], memory_name: str) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [f"| shape | algorithm | timed steps | step (s) | x GRPO beta 0 | generation (s) | rest of step (s) "
             f"| rest x GRPO beta 0 | completions/step | {memory_name} (GiB) | memory x GRPO beta 0 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        label = ALGORITHMS[r["algo"]].label
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | {label} | {r['status']}: {r.get('reason', '')} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['size']} | {label} | {r['timed_steps']} | {r['step_s']:.3f} | {f(r.get('step_vs_grpo'), '.2f')}"
            f" | {r['generation_step_s']:.3f} | {r['rest_of_step_s']:.3f} | {f(r.get('rest_vs_grpo'), '.2f')}"
            f" | {r['completions_per_step']:.0f} | {r['peak_memory_gib']:.2f} | {f(r.get('memory_vs_grpo'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU, grouprl_trl.tiny's 2-layer model, prompt 16 / completion 8 tokens, 8 completions")
    parser.add_argument("--sizes", default=None, help="comma-separated of 1.5b, 7b (default both; --tiny: tiny)")
    parser.add_argument("--algos", default="", help=f"keys of {list(ALGORITHMS)} (default {','.join(DEFAULT_ALGOS)})")
    parser.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (default 256; --tiny 16)")
    parser.add_argument("--completion-length", type=int, default=None, help="completion tokens (default 1024; --tiny 8)")
    parser.add_argument("--rows", type=int, default=None, help="completions per optimizer step (default 16; --tiny 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of the first row of each shape")
    parser.add_argument("--warmup-rest", type=int, default=0,
                        help="untimed steps of the other rows (the process and GPU are warm by then; the first "
                             "row's warm-up vs timed step shows how much a first step costs extra)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row")
    parser.add_argument("--budget-s", type=float, default=420.0, help="plan the rows to end within this (seconds)")
    parser.add_argument("--first-step-guess-s", type=float, default=30.0,
                        help="step time assumed before any step was measured (planning only)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    sizes = (args.sizes or ("tiny" if args.tiny else "1.5b,7b")).split(",")
    for s in sizes:
        if s != "tiny" and s not in QWEN25_MATH:
            parser.error(f"--sizes: unknown shape {s!r}; choose from {', '.join(QWEN25_MATH)} (or --tiny)")
    args.prompt_length = args.prompt_length or (16 if args.tiny else 256)
    args.completion_length = args.completion_length or (8 if args.tiny else 1024)
    args.rows = args.rows or (8 if args.tiny else 16)
    if args.rows % GROUP_SIZE:
        parser.error(f"--rows must be a multiple of the group size {GROUP_SIZE}")
    if args.warmup < 0 or args.warmup_rest < 0 or args.steps < 1:
        parser.error("--warmup and --warmup-rest must be >= 0 and --steps >= 1")
    algos = parse_algos(args.algos, DEFAULT_ALGOS)

    import torch

    common.quiet_transformers()
    args.device = "cpu" if args.tiny else ("cuda" if torch.cuda.is_available() else None)
    if args.device is None:
        parser.error("no CUDA device: run the real shapes on a GPU, or --tiny on a CPU")
    args.bf16 = args.device == "cuda"
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
          + f", shapes {sizes}, algorithms {algos}, {args.rows} completions/step, prompt {args.prompt_length} / "
          f"completion {args.completion_length} tokens, {args.warmup} (first row of a shape) or {args.warmup_rest} "
          f"(other rows) warm-up + {args.steps} timed step(s), "
          f"budget {args.budget_s:.0f} s", flush=True)

    t0 = time.perf_counter()
    results: list[dict] = []
    measured: dict[str, list[float]] = {}
    out = Path(args.out)
    tag = "gpu_step_tiny_cpu" if args.tiny else "gpu_step"
    with tempfile.TemporaryDirectory() as tmpdir:
        saved: dict[str, Path] = {}
        for size in sizes:
            order = [a for a in (PRIORITY_7B if size == "7b" else algos) if a in algos]
            for algo in order:
                warmup = args.warmup if not measured.get(size) else args.warmup_rest
                elapsed = time.perf_counter() - t0
                estimate = plan_estimate(size, args, measured, sizes, warmup)
                if elapsed + estimate > args.budget_s:
                    print(f"[{elapsed:6.0f} s] {size} {algo}: skipped (needs ~{estimate:.0f} s, "
                          f"{args.budget_s - elapsed:.0f} s left of the budget)", flush=True)
                    results.append({"size": size, "algo": algo, "status": "skipped",
                                    "reason": f"time budget (~{estimate:.0f} s needed)"})
                    continue
                print(f"[{elapsed:6.0f} s] {size} {algo}: running (estimate {estimate:.0f} s)", flush=True)
                try:
                    row = run_row(size, algo, args, Path(tmpdir), saved, warmup)
                    measured.setdefault(size, []).extend(row["step_times_s"])
                    print(f"           step {row['step_s']:.2f} s (generation {row['generation_step_s']:.2f} s), "
                          f"peak {row['peak_memory_gib']:.2f} GiB", flush=True)
                except AlgorithmUnavailable as err:
                    row = {"size": size, "algo": algo, "status": "not available", "reason": str(err)}
                except torch.OutOfMemoryError as err:
                    row = {"size": size, "algo": algo, "status": "OOM", "reason": str(err).splitlines()[0][:200]}
                except Exception as err:  # noqa: BLE001 -- record the failure, run the next row
                    row = {"size": size, "algo": algo, "status": "error",
                           "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                if row["status"] != "ok":
                    print(f"           {row['status']}: {row['reason']}", flush=True)
                cleanup()
                if args.device == "cuda":  # what the freed row left behind (should be ~0)
                    row["cuda_allocated_after_row_gib"] = torch.cuda.memory_allocated() / 2**30
                results.append(row)
                # rewrite after every row: a run stopped by the device's time limit keeps what it measured
                write_outputs(out, tag, args, sizes, algos, summarise(results), t0)
    payload = write_outputs(out, tag, args, sizes, algos, summarise(results), t0)
    print()
    print(payload["table"])
    print(f"\n{out / (tag + '.json')}\n{out / (tag + '.md')}\ntotal {payload['total_s']:.0f} s")
    return payload


def write_outputs(out: Path, tag: str, args, sizes, algos, results, t0) -> dict:
    memory_name = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    table = format_table(results, memory_name)
    payload = {"config": {**vars(args), "sizes": sizes, "algos": algos}, "machine": common.machine_info(),
               "shapes": {"1.5b": QWEN25_MATH["1.5b"], "7b": QWEN25_MATH["7b"], "tiny": TINY},
               "results": results, "table": table, "total_s": time.perf_counter() - t0}
    common.write_json(f"{tag}.json", payload, out)
    (out / f"{tag}.md").write_text(
        f"# {tag}\n\nCommand: `python -m bench.gpu_step {' '.join(sys.argv[1:])}`; device {args.device} "
        f"({payload['machine'].get('gpu', payload['machine']['platform'])}); {args.rows} completions per step "
        f"(G = {GROUP_SIZE}), prompt {args.prompt_length} / completion {args.completion_length} tokens; "
        f"{args.warmup} warm-up step(s) in a shape's first row, {args.warmup_rest} in the others, "
        f"{args.steps} timed step(s) per row; total {payload['total_s']:.0f} s.\n\n"
        f"{table}\n")
    return json.loads(json.dumps(payload, default=str))


if __name__ == "__main__":
    main()
