"""Sample efficiency on the toy task, per optimizer step, per generated completion and per second.

    python -m bench.sample_efficiency              # full: 300 steps x 5 seeds, every default algorithm (~1-2 h on 2 cores)
    python -m bench.sample_efficiency --quick      # 60 steps x 2 seeds (~10 min)
    python -m bench.sample_efficiency --algos grpo,gpg --steps 100 --seeds 3
    python -m bench.sample_efficiency --algos grpo,gpg_variants      # GPG's resampling strategies (issue 14)

Setup (``grouprl_trl.demo``'s): the 2-layer tiny Qwen2 from scratch, the 1-digit toy task
(answer ``(7 d + 3) mod 10``; chance about 1/42), 8 generations per prompt, 64 completions per
step, completion length 3, learning rate 2e-3, the same for every algorithm. Each algorithm
uses its own defaults otherwise; the baselines are TRL's GRPO (the original loss,
``loss_type="grpo"``, std-scaled group advantages, no KL), Dr. GRPO (``loss_type="dr_grpo"``,
``scale_rewards="none"``) and the DAPO token-mean loss (``loss_type="dapo"``, TRL 1.16's default;
TRL's clip range, no dynamic sampling). See ``bench/registry.py``.

The reward is the policy's own: for GCPO-gold ``gold/sampled_reward_mean`` (the rollouts as
sampled, before gold injection), since TRL's ``reward`` there includes the injected gold rows.

Three costs of reaching GRPO's final reward (the last-window mean of GRPO's mean curve):
- optimizer steps: the first step at which an algorithm's mean curve (moving average over
  ``--window`` steps, mean over seeds) reaches that level;
- generated completions up to that step (mean over seeds): every completion the trainer generated,
  counted where TRL generates (``GRPOTrainer._generate_single_turn``), so GPG's extra resampling
  rounds count and GCPO-gold's injected gold completions (not generated) do not. GPG's logged
  ``gpg/resample_rounds`` is recorded next to it as a cross-check;
- wall-clock seconds of training up to that step (mean over seeds; from the first step's begin,
  trainer construction excluded).
Ratios are against GRPO's own cost of reaching its final level (< 1: cheaper). "never" when the
mean curve does not get there within ``--steps``.

Runs happen in this process (``--threads`` torch threads, 1 by default), one after the other, seed-major; the algorithm order rotates with the
seed, and one short untimed run first pays the process's one-off costs, so no algorithm always runs
first. Seconds depend on the machine's load: the JSON records load averages per run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

from bench import common
from bench.registry import ALGORITHMS, AlgorithmUnavailable, load, parse_algos

DEFAULT_ALGOS = ["grpo", "dr_grpo", "dapo", "gpg", "gcpo_gold", "copo", "guidance"]


def train_once(algo: str, seed: int, steps: int, lr: float, tmp: Path) -> dict:
    """One run: per-step mean reward, completions generated, cumulative training seconds."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from grouprl_trl._compat import wrap_rollouts
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset, toy_reward

    trainer_cls, config_cls, fields = load(algo)
    tokenizer = build_tokenizer()
    config = config_cls(
        output_dir=str(tmp / f"{algo}-{seed}"), use_cpu=True, report_to="none", bf16=False,
        gradient_checkpointing=False, per_device_train_batch_size=64, num_generations=8, max_completion_length=3,
        learning_rate=lr, max_steps=steps, logging_steps=1, save_strategy="no", seed=seed, disable_tqdm=True,
        **fields,
    )
    rewards: list[float] = []
    resample_rounds: list[float] = []
    gpg_prompts: list[float] = []  # GPG's own count of prompts (groups) it generated per step
    clock = {"start": None}
    step_ends: list[float] = []
    generated: list[int] = []  # completions generated in each optimizer step
    key = ALGORITHMS[algo].reward_key

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if clock["start"] is None:
                clock["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter() - clock["start"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(float(logs[key]))
                if "gpg/resample_rounds" in logs:
                    resample_rounds.append(float(logs["gpg/resample_rounds"]))
                if "gpg/generated_prompts" in logs:
                    gpg_prompts.append(float(logs["gpg/generated_prompts"]))

    trainer = trainer_cls(
        model=build_tiny_model(tokenizer, seed=seed), reward_funcs=toy_reward, args=config,
        train_dataset=build_toy_dataset(num_rows=2000, seed=seed), processing_class=tokenizer, callbacks=[Probe()],
    )
    trainer.remove_callback(PrinterCallback)

    def counting(generate):  # every rollout passes here (GPG's extra rounds too)
        def counting_generate(*args, **kwargs):
            out = generate(*args, **kwargs)
            step = len(step_ends)
            generated.extend([0] * (step + 1 - len(generated)))
            generated[step] += len(out[0])
            return out

        return counting_generate

    wrap_rollouts(trainer, counting)
    trainer.train()
    generated.extend([0] * (len(step_ends) - len(generated)))
    return {"rewards": rewards, "completions": generated[: len(step_ends)], "seconds": step_ends,
            "resample_rounds": resample_rounds, "gpg_generated_prompts": gpg_prompts, "load_1m": os.getloadavg()[0]}


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def first_step_reaching(curve: list[float], level: float) -> int | None:
    """1-based step at which ``curve`` first reaches ``level``, or None."""
    for i, v in enumerate(curve):
        if v >= level:
            return i + 1
    return None


def cost_to_reach(runs: list[dict], step: int | None, field: str) -> float | None:
    """Mean over seeds of the cumulative ``field`` (completions or seconds) at 1-based ``step``."""
    if step is None:
        return None
    if field == "completions":
        return statistics.fmean(sum(r["completions"][:step]) for r in runs)
    return statistics.fmean(r["seconds"][step - 1] for r in runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 steps x 2 seeds (unless given)")
    parser.add_argument("--algos", default="", help=f"comma-separated keys of {list(ALGORITHMS)} or 'all' "
                        f"(default {','.join(DEFAULT_ALGOS)})")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; --quick 60)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 5; --quick 2)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model's small matrix products run several times "
                        "faster on one thread than on oversubscribed cores of a shared machine; 0 = torch's default)")
    parser.add_argument("--window", type=int, default=10, help="moving-average window (steps)")
    parser.add_argument("--reference", default="grpo", help="whose final reward is the level to reach")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 300)
    args.seeds = args.seeds or (2 if args.quick else 5)
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be >= 1")
    algos = parse_algos(args.algos, DEFAULT_ALGOS)

    import tempfile

    from tqdm.auto import tqdm

    common.quiet_transformers()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    unavailable = {}
    for a in algos:
        try:
            load(a)
        except AlgorithmUnavailable as err:
            unavailable[a] = str(err)
    runnable = [a for a in algos if a not in unavailable]
    runs: dict[str, list[dict]] = {a: [] for a in runnable}
    machine_start = common.machine_info()
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=len(runnable) * args.seeds, desc="runs") as bar:
        if runnable:  # one-off costs (imports, first trainer, allocator) land here, not on the first algorithm
            train_once(runnable[0], 0, 3, args.lr, Path(tmp) / "warmup")
        for seed in range(args.seeds):
            k = seed % len(runnable)
            for a in runnable[k:] + runnable[:k]:
                bar.set_postfix(seed=seed, algo=a)
                runs[a].append(train_once(a, seed, args.steps, args.lr, Path(tmp)))
                bar.update(1)

    smoothed = {a: [moving_average(r["rewards"], args.window) for r in rs] for a, rs in runs.items()}
    mean_curve = {a: [statistics.fmean(v) for v in zip(*cs)] for a, cs in smoothed.items()}
    std_curve = {a: [statistics.pstdev(v) for v in zip(*cs)] for a, cs in smoothed.items()}
    reference = args.reference if args.reference in runnable else None
    level = mean_curve[reference][-1] if reference else None
    ref_steps = first_step_reaching(mean_curve[reference], level) if reference else None
    ref_cost = {f: cost_to_reach(runs[reference], ref_steps, f) for f in ("completions", "seconds")} if reference else {}

    def ratio(value, ref):
        return value / ref if value is not None and ref else None

    rows = []
    for a in algos:
        if a in unavailable:
            rows.append({"algo": a, "label": ALGORITHMS[a].label, "available": False, "reason": unavailable[a]})
            continue
        finals = [c[-1] for c in smoothed[a]]
        steps_to = first_step_reaching(mean_curve[a], level) if level is not None else None
        completions_to = cost_to_reach(runs[a], steps_to, "completions")
        seconds_to = cost_to_reach(runs[a], steps_to, "seconds")
        all_steps = list(itertools.chain.from_iterable(r["completions"] for r in runs[a]))
        rounds = list(itertools.chain.from_iterable(r["resample_rounds"] for r in runs[a]))
        prompts = list(itertools.chain.from_iterable(r.get("gpg_generated_prompts", []) for r in runs[a]))
        rows.append({
            "algo": a, "label": ALGORITHMS[a].label, "available": True,
            "final_reward_mean": statistics.fmean(finals),
            "final_reward_std": statistics.pstdev(finals),
            "steps_to_reference_final": steps_to,
            "steps_ratio_vs_reference": ratio(steps_to, ref_steps),
            "completions_to_reference_final": completions_to,
            "completions_ratio_vs_reference": ratio(completions_to, ref_cost.get("completions")),
            "seconds_to_reference_final": seconds_to,
            "seconds_ratio_vs_reference": ratio(seconds_to, ref_cost.get("seconds")),
            "completions_per_step": statistics.fmean(all_steps),
            "seconds_per_step": statistics.fmean(r["seconds"][-1] / len(r["seconds"]) for r in runs[a]),
            # cross-check of the count: GPG's own log says 8 x gpg/generated_prompts per step
            "gpg_resample_rounds_per_step": statistics.fmean(rounds) if rounds else None,
            "gpg_generated_prompts_per_step": statistics.fmean(prompts) if prompts else None,
        })

    ref_label = ALGORITHMS[reference].label if reference else "n/a"

    def fmt(value, spec, none="n/a"):
        return none if value is None else format(value, spec)

    head = f"GRPO's final ({level:.3f})" if level is not None else "the reference's final"
    lines = [f"| algorithm | final reward (mean ± std, {args.seeds} seeds) | steps to {head} | x {ref_label} "
             f"| completions to it | x {ref_label} | seconds to it | x {ref_label} | completions/step | s/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["available"]:
            lines.append(f"| {r['label']} | not available | | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['final_reward_mean']:.3f} ± {r['final_reward_std']:.3f}"
            f" | {fmt(r['steps_to_reference_final'], 'd', 'never')} | {fmt(r['steps_ratio_vs_reference'], '.2f')}"
            f" | {fmt(r['completions_to_reference_final'], '.0f', 'never')} | {fmt(r['completions_ratio_vs_reference'], '.2f')}"
            f" | {fmt(r['seconds_to_reference_final'], '.1f', 'never')} | {fmt(r['seconds_ratio_vs_reference'], '.2f')}"
            f" | {r['completions_per_step']:.1f} | {r['seconds_per_step']:.3f} |")
    table = "\n".join(lines)
    print()
    print(table)
    for a, why in unavailable.items():
        print(f"{ALGORITHMS[a].label}: not available ({why})")
    for gpg in (r for r in rows if r["available"] and (r["algo"] == "gpg" or r["algo"].startswith("gpg_"))):
        if gpg["gpg_generated_prompts_per_step"] is not None:
            print(f"{gpg['label']}: {gpg['completions_per_step']:.1f} completions/step counted at generation; its log "
                  f"(gpg/generated_prompts x 8) gives {8 * gpg['gpg_generated_prompts_per_step']:.1f}, "
                  f"{gpg['gpg_resample_rounds_per_step']:.2f} extra rounds/step")
        if gpg.get("completions_ratio_vs_reference") is not None:
            verdict = "met" if gpg["completions_ratio_vs_reference"] <= 1.0 else "NOT met"
            print(f"target {gpg['label']} reaches {ref_label}'s final with <= 1.0x its completions: "
                  f"{gpg['completions_ratio_vs_reference']:.2f}x -> {verdict}")

    out = Path(args.out)
    tag = f"sample_efficiency_{args.steps}steps_{args.seeds}seeds"
    payload = {"config": vars(args), "machine": machine_start, "loadavg_end": os.getloadavg(),
               "reference_level": level, "summary": rows, "table": table, "runs": runs}
    json_path = common.write_json(f"{tag}.json", payload, out)
    plot(runnable, runs, mean_curve, std_curve, level, ref_label, args, out / f"{tag}.png")
    print(f"\n{json_path}\n{out / (tag + '.png')}")
    return payload


def plot(runnable, runs, mean_curve, std_curve, level, ref_label, args, path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    for i, a in enumerate(runnable):
        m, s = mean_curve[a], std_curve[a]
        completions = [statistics.fmean(v) for v in zip(*(itertools.accumulate(r["completions"]) for r in runs[a]))]
        seconds = [statistics.fmean(v) for v in zip(*(r["seconds"] for r in runs[a]))]
        for ax, x in zip(axes, (range(1, len(m) + 1), completions, seconds)):
            ax.plot(x, m, label=ALGORITHMS[a].label, color=f"C{i}")
            ax.fill_between(x, [u - v for u, v in zip(m, s)], [u + v for u, v in zip(m, s)], color=f"C{i}", alpha=0.12)
    for ax, xlabel in zip(axes, ("optimizer step", "completions generated (mean over seeds)",
                                 "training seconds (mean over seeds)")):
        if level is not None:
            ax.axhline(level, color="black", linestyle="--", linewidth=0.8, label=f"{ref_label} final")
        ax.axhline(1 / 42, color="grey", linestyle=":", label="chance (1/42)")
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel(f"reward (moving average {args.window}); band = ± std over seeds")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Toy task, tiny model: {args.seeds} seeds x {args.steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
