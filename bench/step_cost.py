"""Step cost: median optimizer-step time and peak memory of each trainer on one model and batch.

    python -m bench.step_cost                                  # CPU, the default algorithms
    python -m bench.step_cost --algos grpo,gpg --rounds 5
    python -m bench.step_cost --device cuda --bf16 --rows 64 --completion-length 256

Setup (the same for every algorithm): the tiny Qwen2 of ``grouprl_trl.tiny`` with 4 layers and
hidden size 256, ``--rows`` completions per step (groups of 8), exactly ``--completion-length``
tokens per completion (``min_new_tokens`` forces the length, so every algorithm does the same
work), one optimizer step per generation (TRL defaults), no gradient checkpointing.

Rewards are chosen so that no algorithm changes the batch: an alternating 0/1 reward gives
every group non-equal rewards (GPG never regenerates, GCPO-guidance's filter keeps every
group). GCPO-gold instead gets the toy task's reward, which a fresh model almost never earns,
so nearly every group is all-wrong and gets a gold completion: its worst case.

Method:
- each (algorithm, round) runs in its own Python process, so peak memory is that algorithm's
  own: on CPU the kernel's peak RSS (``VmHWM``, reset just before ``train()``), on CUDA
  ``torch.cuda.max_memory_allocated``. The rounds interleave the algorithms
  (A, B, C, A, B, C, ...) so that a slow phase of a shared machine hits all of them;
- step time = time between consecutive ``on_step_end`` callbacks (generation, scoring,
  forward/backward, optimizer step), the first ``--warmup`` steps excluded; median per run.
  Both the wall clock and the process's CPU time (``time.process_time``) are recorded: with
  ``--threads 1`` the CPU time is what the step costs even while other processes compete for the
  cores, the wall clock is what a quiet machine shows;
- ratios are taken within a round (algorithm vs reference in the same round; the order of the
  algorithms rotates from round to round); the summary is the geometric mean of the per-round
  ratios with a 95% confidence interval (Student t on their logarithms) and the median. The 1-minute load average is recorded before every run.

``--in-process`` runs every round in the benchmark's own process instead (no memory numbers): runs
in separate processes differ by a few percent for reasons that have nothing to do with the
algorithm (the same algorithm's per-run medians spread by about +-4%), and the paired in-process
design cancels that.

The GPG targets (issue 14) in one line each, for a quiet machine:

    python -m bench.step_cost --algos grpo_kl,grpo,gpg --rounds 12 --steps 5 --threads 1
    python -m bench.step_cost --algos grpo_kl,grpo,gpg --rounds 12 --steps 5 --threads 1 --in-process
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import common
from bench.registry import ALGORITHMS, AlgorithmUnavailable, load, parse_algos

DEFAULT_ALGOS = ["grpo_kl", "grpo", "gpg", "gcpo_gold", "copo", "guidance"]
# (numerator, denominator, target): "GPG <= 0.85x GRPO(beta 0.04)" etc.
TARGETS = [
    ("gpg", "grpo_kl", 0.85),
    ("gpg", "grpo", 1.00),
    ("guidance", "grpo", 1.7),
]
# two-sided 95% Student t quantiles by degrees of freedom (no scipy in the environment)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
GROUP_SIZE = 8


# ----------------------------------------------------------------------------- worker (one run)
def alternating_reward(completions, **kwargs):
    """0, 1, 0, 1, ...: every group of even size has non-equal rewards."""
    return [float(i % 2) for i in range(len(completions))]


def run_worker(args) -> dict:
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from grouprl_trl.tiny import build_tokenizer, build_toy_dataset, save_tiny_model, toy_reward

    common.quiet_transformers()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    trainer_cls, config_cls, fields = load(args.worker)
    tokenizer = build_tokenizer()
    # Loaded from a path (saved once per benchmark run): TRL builds the beta > 0 reference model
    # from the model's name_or_path, which an in-memory model does not have.
    model_path = Path(args.tmp) / "tiny-4x256"
    if not (model_path / "config.json").exists():
        save_tiny_model(model_path, num_layers=4, hidden_size=256, seed=0)
    model = str(model_path)
    cuda = args.device == "cuda"
    config = config_cls(
        output_dir=str(Path(args.tmp) / args.worker),
        use_cpu=not cuda,
        report_to="none",
        bf16=args.bf16,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.rows,
        num_generations=GROUP_SIZE,
        max_completion_length=args.completion_length,
        generation_kwargs={"min_new_tokens": args.completion_length},
        learning_rate=1e-4,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **fields,
    )
    reward = toy_reward if args.worker == "gcpo_gold" else alternating_reward
    ends: list[float] = []
    cpu_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=build_toy_dataset(num_rows=1000, seed=0),
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    rss_before = common.rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    measured = common.reset_peak_rss()
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    # step i's time = end_i - end_{i-1} (step 0 from train() start); warm-up steps dropped
    times = [b - a for a, b in zip([start] + ends[:-1], ends)][args.warmup :]
    cpu_times = [b - a for a, b in zip([cpu_start] + cpu_ends[:-1], cpu_ends)][args.warmup :]
    result = {
        "algo": args.worker,
        "step_times_s": times,
        "median_step_s": statistics.median(times),
        "cpu_step_times_s": cpu_times,
        "median_cpu_step_s": statistics.median(cpu_times),
        "loadavg_1m_before": load_before,
        "peak_rss_mb": common.rss_mb("VmHWM") if measured else None,
        "rss_before_train_mb": rss_before,
        # what training adds on top of the process baseline (Python, torch, the loaded model)
        "peak_rss_increase_mb": (common.rss_mb("VmHWM") - rss_before) if measured and rss_before else None,
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# ----------------------------------------------------------------------------- driver
def run_in_process(algo: str, args, tmp: str) -> dict:
    """``--in-process``: the run in this process (peak memory is then shared by every run: not reported)."""
    ns = argparse.Namespace(**{**vars(args), "worker": algo, "tmp": tmp})
    try:
        result = run_worker(ns)
    except AlgorithmUnavailable as err:
        return {"algo": algo, "error": str(err)}
    for key in ("peak_rss_mb", "rss_before_train_mb", "peak_rss_increase_mb", "peak_cuda_mb"):
        result.pop(key, None)
    return result


def run_one(algo: str, args, tmp: str) -> dict:
    if args.in_process:
        return run_in_process(algo, args, tmp)
    cmd = [*common.python_cmd(), "-m", "bench.step_cost", "--worker", algo, "--tmp", tmp,
           "--device", args.device, "--rows", str(args.rows), "--completion-length", str(args.completion_length),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.bf16:
        cmd.append("--bf16")
    proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=common.subprocess_env(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"algo": algo, "error": " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT ") :])


def memory_of(run: dict) -> float | None:
    return run.get("peak_cuda_mb", run.get("peak_rss_mb"))


def summarise(algos: list[str], runs: dict[str, list[dict]], reference: str) -> list[dict]:
    rows = []
    ok = {a: [r for r in runs[a] if "error" not in r] for a in algos}
    for a in algos:
        if not ok[a]:
            reason = runs[a][0].get("error", "no run") if runs[a] else "no run"
            rows.append({"algo": a, "label": ALGORITHMS[a].label, "available": False, "reason": reason})
            continue
        step = statistics.median(r["median_step_s"] for r in ok[a])
        mem = [memory_of(r) for r in ok[a] if memory_of(r) is not None]
        increase = [r["peak_rss_increase_mb"] for r in ok[a] if r.get("peak_rss_increase_mb") is not None]
        row = {"algo": a, "label": ALGORITHMS[a].label, "available": True, "median_step_s": step,
               "peak_memory_mb": max(mem) if mem else None, "rounds": len(ok[a]),
               "peak_rss_increase_mb": max(increase) if increase else None}
        if ok.get(reference):
            row[f"ratio_vs_{reference}"] = paired_ratio(runs[a], runs[reference])
        rows.append(row)
    return rows


def per_round_ratios(num_runs: list[dict], den_runs: list[dict], key: str = "median_step_s") -> list[float]:
    """numerator / denominator median step (``key``) of each round where both ran."""
    return [n[key] / d[key] for n, d in zip(num_runs, den_runs, strict=True)
            if "error" not in n and "error" not in d and key in n and key in d]


def paired_ratio(num_runs: list[dict], den_runs: list[dict]) -> float | None:
    """Median over rounds of (numerator median step / denominator median step) in the same round."""
    ratios = per_round_ratios(num_runs, den_runs)
    return statistics.median(ratios) if ratios else None


def ratio_ci(ratios: list[float]) -> tuple[float, float, float] | None:
    """Geometric mean of per-round ratios and its 95% confidence interval (Student t on the log ratios; one
    value: no interval). Logs, because a ratio of two noisy times is skewed: the arithmetic mean of
    x / y and of y / x cannot both be 1 when the two algorithms cost the same."""
    if not ratios:
        return None
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.nan, math.nan
    df = len(logs) - 1
    t = T_975.get(df) or next((T_975[k] for k in sorted(T_975) if k >= df), 1.96)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def check_targets(runs: dict[str, list[dict]]) -> list[dict]:
    """Each target on the wall-clock ratios (geometric mean of per-round ratios, 95% CI, median) and on CPU time."""
    out = []
    for num, den, target in TARGETS:
        if num not in runs or den not in runs:
            continue
        entry = {"numerator": num, "denominator": den, "target_max": target}
        for clock, key in (("wall", "median_step_s"), ("cpu", "median_cpu_step_s")):
            ratios = per_round_ratios(runs[num], runs[den], key)
            stats = ratio_ci(ratios)
            entry[clock] = {"ratios": ratios, "mean": stats and stats[0], "ci95": stats and [stats[1], stats[2]],
                            "median": statistics.median(ratios) if ratios else None}
        mean = entry["wall"]["mean"]
        entry["ratio"] = mean
        entry["met"] = None if mean is None else mean <= target
        out.append(entry)
    return out


def format_target(t: dict) -> str:
    def one(clock):
        c = t[clock]
        if c["mean"] is None:
            return f"{clock}: n/a"
        lo, hi = c["ci95"]
        ci = "" if math.isnan(lo) else f" [95% CI {lo:.3f}, {hi:.3f}]"
        return f"{clock}: geometric mean {c['mean']:.3f}{ci}, median {c['median']:.3f}, {len(c['ratios'])} rounds"

    verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
    return (f"target {ALGORITHMS[t['numerator']].label} <= {t['target_max']}x {ALGORITHMS[t['denominator']].label}: "
            f"{one('wall')} -> {verdict} (by the wall-clock mean); {one('cpu')}")


def format_table(rows: list[dict], reference: str, memory_name: str) -> str:
    lines = [f"| algorithm | median step (s) | x {ALGORITHMS[reference].label} | {memory_name} "
             "| peak RSS over pre-train RSS (MiB) |", "|---|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in rows:
        if not r["available"]:
            lines.append(f"| {r['label']} | not available | | | |")
            continue
        lines.append(f"| {r['label']} | {r['median_step_s']:.3f} | {fmt(r.get(f'ratio_vs_{reference}'), '.2f')} "
                     f"| {fmt(r['peak_memory_mb'], '.0f')} | {fmt(r.get('peak_rss_increase_mb'), '.0f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], runs: dict[str, list[dict]], path: Path, memory_name: str) -> None:
    plt = common.pyplot()
    avail = [r for r in rows if r["available"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r["label"] for r in avail]
    for i, r in enumerate(avail):  # every measured step of every round, plus the median
        times = [t for run in runs[r["algo"]] if "error" not in run for t in run["step_times_s"]]
        ax1.scatter([i] * len(times), times, s=8, alpha=0.4, color="grey")
        ax1.scatter([i], [r["median_step_s"]], marker="_", s=400, color="C0")
    ax1.set_xticks(range(len(avail)), labels, rotation=30, ha="right")
    ax1.set_ylabel("step time (s); bar = median")
    ax1.set_ylim(bottom=0)
    cpu = memory_name == "peak RSS"
    key = "peak_rss_increase_mb" if cpu else "peak_memory_mb"  # on CPU the process baseline would hide differences
    ax2.bar(range(len(avail)), [r.get(key) or 0 for r in avail], color="C1")
    ax2.set_xticks(range(len(avail)), labels, rotation=30, ha="right")
    ax2.set_ylabel("peak RSS minus pre-train RSS (MiB)" if cpu else f"{memory_name} (MiB)")
    fig.suptitle("Step cost on the 4-layer / 256-hidden tiny Qwen2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="", help=f"comma-separated keys of {list(ALGORITHMS)} or 'all' "
                        f"(default {','.join(DEFAULT_ALGOS)})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU runs)")
    parser.add_argument("--rows", type=int, default=32, help="completions per step (a multiple of 8)")
    parser.add_argument("--completion-length", type=int, default=32, help="tokens per completion (forced)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run excluded from the timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every algorithm")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per run (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--in-process", action="store_true",
                        help="run every round in this one process instead of one process per run: cancels "
                        "process-level differences (memory layout, allocator state; about +-4%% per run on CPU) "
                        "from the ratios, but reports no peak memory")
    parser.add_argument("--reference", default="grpo", help="the ratio column's denominator")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one algorithm and print RESULT
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rows % GROUP_SIZE:
        parser.error(f"--rows must be a multiple of the group size {GROUP_SIZE}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")

    if args.worker:
        try:
            print("RESULT " + json.dumps(run_worker(args)), flush=True)
        except AlgorithmUnavailable as err:
            print(f"not available: {err}", file=sys.stderr)
            sys.exit(3)
        return None

    import tempfile

    from tqdm.auto import tqdm

    algos = parse_algos(args.algos, DEFAULT_ALGOS)
    reference = args.reference if args.reference in algos else algos[0]
    runs: dict[str, list[dict]] = {a: [] for a in algos}
    available = {}
    for a in algos:  # check imports once here, so an unavailable trainer costs no subprocess per round
        try:
            load(a)
            available[a] = True
        except AlgorithmUnavailable as err:
            available[a] = False
            runs[a] = [{"algo": a, "error": str(err)}]
    out = Path(args.out)
    tag = f"step_cost_{args.device}{'_bf16' if args.bf16 else ''}{'_in_process' if args.in_process else ''}"
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=args.rounds * sum(available.values()),
                                                    desc="runs") as bar:
        for rnd in range(args.rounds):
            # rotate the order each round, so no algorithm always runs first (or right after the same one)
            for a in algos[rnd % len(algos):] + algos[: rnd % len(algos)]:
                if not available[a]:
                    continue
                bar.set_postfix(round=rnd + 1, algo=a)
                runs[a].append(run_one(a, args, tmp))
                common.write_json(f"{tag}.partial.json", {"runs": runs}, out)  # survives an interrupted run
                bar.update(1)
    (out / f"{tag}.partial.json").unlink(missing_ok=True)
    memory_name = "peak CUDA allocated" if args.device == "cuda" else "peak RSS"
    rows = summarise(algos, runs, reference)
    targets = check_targets(runs)
    print()
    print(format_table(rows, reference, memory_name + " (MiB)"))
    for row in rows:
        if not row["available"]:
            print(f"{row['label']}: not available ({row['reason']})")
    for t in targets:
        print(format_target(t))
    loads = [r["loadavg_1m_before"] for rs in runs.values() for r in rs if "loadavg_1m_before" in r]
    if loads:
        print(f"load average (1 min) before the runs: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
              f"max {max(loads):.2f} on {os.cpu_count()} CPUs")
    payload = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "tmp")},
               "machine": common.machine_info(), "summary": rows, "targets": targets, "runs": runs}
    json_path = common.write_json(f"{tag}.json", payload, out)
    plot(rows, runs, out / f"{tag}.png", memory_name)
    print(f"\n{json_path}\n{out / (tag + '.png')}")
    return payload


if __name__ == "__main__":
    main()
