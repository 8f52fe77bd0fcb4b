"""Advantage computation at scale: grouprl vs verl 0.9.1's fastest built-in path and the memory floor.

    python -m bench.advantage_scale            # full: B = 1k .. 1M, L = 256, G = 8, 7 rounds (~5 min on 2 cores)
    python -m bench.advantage_scale --quick    # B = 1k .. 65k, 3 rounds (~1 min)

What a verl advantage estimator does (``ray_trainer.compute_advantage`` calls the registered function
with the whole generation batch): sum the token-level rewards to one score per sample, map the uid
strings (``non_tensor_batch["uid"]``, ``str(uuid4())`` per prompt) to groups, compute one advantage
per sample, and return a fresh ``(B, L)`` float32 tensor: the advantage on every response token.

Timed, per batch size B (each call returns its own output, as verl stores it in the batch):

- floor: ``adv[:, None] * mask`` into a fresh float32 ``(B, L)`` tensor from a precomputed ``(B,)``
  advantage. This is the one piece of work no estimator can avoid: allocate the output verl stores
  and write it once, reading the mask it depends on; its cost includes the page faults of the new
  allocation, which every estimator pays too. Three ways to do it with torch are timed (one output
  allocation each): the fused mixed-dtype multiply, the mask converted to float32 and multiplied in
  place, and ``torch.where`` on the mask; the floor of a round is the fastest of the three in that
  round (a minimum over three noisy timings, so if anything the floor is measured low). With verl's
  int64 mask the fused multiply is the slowest on CPU: its int64 -> float cast runs element by element. ``write-only`` (``adv[:, None].expand(B, L).contiguous()``, no mask read)
  is timed as a lower reference, not as the target.
- grouprl full call: the registered estimators ``grouprl_gcpo`` (GRPO's advantage; also what
  ``grouprl_guidance`` and ``grouprl_copo`` compute) and ``grouprl_gpg``, called as verl calls them.
- grouprl core: ``grpo_advantages`` / ``gpg_advantages`` on precomputed scores and group ids (``(B,)``
  output), and core + broadcast (the ``(B, L)`` output, without the reward sum and uid mapping).
- verl: ``grpo_vectorized`` (verl's fastest GRPO path) and the Python-loop ``grpo``; for GPG the
  built-in ``gpg`` (Python loop; verl 0.9.1 ships no vectorised GPG) and a vectorised equivalent made
  of verl's parts: ``grpo_vectorized`` with ``norm_adv_by_std_in_grpo=False`` times verl's GPG alpha
  ``B / count_nonzero(scores)``, in place. The loops take seconds per call beyond ``--loop-max``
  samples and are not run there.

Inputs: G completions per prompt, rewards 0/1 with a per-prompt success rate in {0, 1/4, .., 1} (so
some groups are zero-variance), random response lengths, the score on the last response token,
verl's int64 response mask, uuid4 strings as uids in shuffled order (verl's default
``trainer.balance_batch`` reorders the batch by sequence length before the advantage).

Method: all timed callables of one B run in rounds, in a rotated order each round, after one untimed
warm-up call each; ratios are taken per round and the median over rounds is reported (with the
min-max range), so drift and contention between rounds cancel. Load averages are recorded at start
and end. Targets: grouprl's full call never slower than verl's fastest path at any B, and within
1.5x of the floor at B >= 65536.

Agreement: grouprl GRPO equals verl's GRPO (max abs difference printed). GPG's alpha differs on
purpose (verl: ``B / count_nonzero(rewards)``; the paper and grouprl: ``B / (B - M)``), so the check
is grouprl's output rescaled to verl's alpha against verl's.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from pathlib import Path

from bench import common

FULL_SIZES = "1024,4096,16384,65536,262144,1048576"
QUICK_SIZES = "1024,4096,16384,65536"
TARGET_VS_VERL = 1.0  # grouprl full call / verl's fastest path, at every B
TARGET_VS_FLOOR = 1.5  # grouprl full call / floor, at B >= FLOOR_TARGET_FROM
FLOOR_TARGET_FROM = 65536


def make_batch(batch_size: int, group_size: int, length: int, *, layout: str, mask_dtype: str, seed: int = 0):
    """verl-style inputs: token-level rewards (score on the last response token), mask, uid strings."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch_size,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(getattr(torch, mask_dtype))
    num_prompts = batch_size // group_size
    # per-prompt success rate in {0, 0.25, 0.5, 0.75, 1}: some groups all-wrong or all-right (zero-variance)
    p = torch.randint(0, 5, (num_prompts,), generator=g).float().div(4).repeat_interleave(group_size)
    scores = (torch.rand(batch_size, generator=g) < p).to(torch.float32)
    token_rewards = torch.zeros(batch_size, length)
    token_rewards[torch.arange(batch_size), lengths - 1] = scores
    rng = random.Random(seed)
    import uuid

    # verl: one str(uuid4()) per prompt, repeated rollout.n times (interleaved); the same str objects repeat
    prompt_uids = np.array([str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(num_prompts)],
                           dtype=object)
    uids = prompt_uids.repeat(group_size)
    if layout == "shuffled":
        order = torch.randperm(batch_size, generator=g)
        token_rewards, mask, uids = token_rewards[order], mask[order], uids[order.numpy()]
    return token_rewards.contiguous(), mask.contiguous(), uids


def build_calls(token_rewards, mask, uids, loop_max: int) -> dict:
    """Name -> zero-argument callable returning what that path returns (the (B, L) tensor or (B,))."""
    import torch
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    import grouprl_verl.estimators as est
    from grouprl_core import gpg_advantages, grpo_advantages

    b, length = mask.shape
    scores = token_rewards.sum(dim=-1)
    group_ids = est.group_ids_from_index(uids, b, "bench")
    adv = grpo_advantages(scores, group_ids, eps=1e-6)  # the floor's input: any (B,) float32 vector
    verl_grpo_vec = get_adv_estimator_fn("grpo_vectorized")
    verl_grpo_loop = get_adv_estimator_fn("grpo")
    verl_gpg_loop = get_adv_estimator_fn("gpg")
    ours_grpo = get_adv_estimator_fn(est.GCPO)
    ours_gpg = get_adv_estimator_fn(est.GPG)

    def verl_gpg_vectorised():
        # verl's GPG from verl's vectorised parts: alpha (r - mean_g), alpha = B / count_nonzero(scores)
        s = token_rewards.sum(dim=-1)
        alpha = s.numel() / torch.count_nonzero(s).clamp(min=1)
        out, _ = verl_grpo_vec(token_level_rewards=token_rewards, response_mask=mask, index=uids,
                               norm_adv_by_std_in_grpo=False)
        return out.mul_(alpha)

    bool_mask = mask if mask.dtype == torch.bool else None
    calls = {
        "floor_fused_multiply": lambda: adv.unsqueeze(-1) * mask,
        "floor_convert_multiply": lambda: mask.to(torch.float32, copy=True).mul_(adv.unsqueeze(-1)),
        "floor_where": lambda: torch.where(bool_mask if bool_mask is not None else mask.bool(), adv.unsqueeze(-1), 0.0),
        "write_only": lambda: adv.unsqueeze(-1).expand(b, length).contiguous(),
        "grouprl_grpo_full": lambda: ours_grpo(token_level_rewards=token_rewards, response_mask=mask, index=uids,
                                               config=None)[0],
        "grouprl_grpo_core": lambda: grpo_advantages(scores, group_ids, eps=1e-6),
        "grouprl_grpo_core_bcast": lambda: est._broadcast(grpo_advantages(scores, group_ids, eps=1e-6), mask),
        "verl_grpo_vectorized": lambda: verl_grpo_vec(token_level_rewards=token_rewards, response_mask=mask,
                                                      index=uids)[0],
        "grouprl_gpg_full": lambda: ours_gpg(token_level_rewards=token_rewards, response_mask=mask, index=uids,
                                             config=None)[0],
        "grouprl_gpg_core": lambda: gpg_advantages(scores, group_ids).advantages,
        "grouprl_gpg_core_bcast": lambda: est._broadcast(gpg_advantages(scores, group_ids).advantages, mask),
        "verl_gpg_vectorised_equiv": verl_gpg_vectorised,
    }
    if b <= loop_max:
        # the loops build their own score tensor (token_level_rewards.sum) and never write to their inputs
        calls["verl_grpo_loop"] = lambda: verl_grpo_loop(token_level_rewards=token_rewards, response_mask=mask,
                                                         index=uids)[0]
        calls["verl_gpg_loop"] = lambda: verl_gpg_loop(token_level_rewards=token_rewards, response_mask=mask,
                                                       index=uids)[0]
    return calls


def agreement(calls: dict, scores) -> dict:
    """Max abs differences between grouprl's and verl's outputs, and both GPG alphas."""
    import torch

    import grouprl_verl.estimators as est

    ours_grpo = calls["grouprl_grpo_full"]()
    ours_gpg = calls["grouprl_gpg_full"]()
    alpha_ours = est.LAST_METRICS["gpg/alpha"]
    alpha_verl = scores.numel() / max(1, int(torch.count_nonzero(scores)))  # verl 0.9.1's gpg estimator
    # grouprl's GPG with verl's alpha (all-zero-variance batches have alpha 0 and output 0 on both sides)
    ours_gpg_verl_alpha = ours_gpg / alpha_ours * alpha_verl if alpha_ours > 0 else ours_gpg
    verl_gpg = calls["verl_gpg_vectorised_equiv"]()
    out = {
        "alpha_grouprl_paper": alpha_ours,
        "alpha_verl_builtin": alpha_verl,
        "grpo_vs_verl_grpo_vectorized": float((ours_grpo - calls["verl_grpo_vectorized"]()).abs().max()),
        "gpg_vs_verl_gpg_vectorised_equiv_same_alpha": float((ours_gpg_verl_alpha - verl_gpg).abs().max()),
    }
    if "verl_grpo_loop" in calls:
        loop = calls["verl_gpg_loop"]()
        out["grpo_vs_verl_grpo_loop"] = float((ours_grpo - calls["verl_grpo_loop"]()).abs().max())
        out["gpg_vs_verl_gpg_loop_same_alpha"] = float((ours_gpg_verl_alpha - loop).abs().max())
        out["verl_gpg_vectorised_equiv_vs_verl_gpg_loop"] = float((verl_gpg - loop).abs().max())
    return out


def time_rounds(calls: dict, rounds: int, min_seconds: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of every callable in ``rounds`` rounds (rotated order), after warm-up calls.

    A call faster than ``min_seconds`` is repeated inside one measurement (as timeit's autorange) so that
    a measurement is not one scheduler tick; the time is the mean over those calls.
    """
    names = list(calls)
    inner = {}
    for name in names:
        start = time.perf_counter()
        calls[name]()  # warm-up: lazy imports, first-call caches
        if time.perf_counter() - start > min_seconds:  # slow anyway: one call per measurement
            inner[name] = 1
            continue
        calibration = []
        for _ in range(3):
            start = time.perf_counter()
            calls[name]()
            calibration.append(time.perf_counter() - start)
        inner[name] = max(1, math.ceil(min_seconds / max(statistics.median(calibration), 1e-7)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = calls[name], inner[name]
            start = time.perf_counter()
            for _ in range(n):
                out = fn()
                del out  # free the (B, L) output before the next call, as verl does after the step
            times[name].append((time.perf_counter() - start) / n)
    return times, inner


def ratio_stats(num: list[float], den: list[float]) -> dict:
    per_round = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "per_round": per_round}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"sizes {QUICK_SIZES}, 3 rounds, loops up to 16384 samples; files *_quick.*")
    parser.add_argument("--sizes", default=None, help=f"comma-separated batch sizes B (default {FULL_SIZES})")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="response length L (tokens)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per B (default 7; --quick 3)")
    parser.add_argument("--loop-max", type=int, default=None,
                        help="largest B at which verl's Python-loop estimators run (default 65536; --quick 16384)")
    parser.add_argument("--layout", choices=["shuffled", "contiguous"], default="shuffled",
                        help="sample order: shuffled (verl's balance_batch, default) or groups contiguous")
    parser.add_argument("--mask-dtype", choices=["int64", "float32", "bool"], default="int64",
                        help="response mask dtype (verl: int64, a slice of the attention mask)")
    parser.add_argument("--min-seconds", type=float, default=0.05,
                        help="a faster call is repeated within one measurement until about this long")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    parser.add_argument("--out", default=str(common.RESULTS_DIR))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")]
    rounds = args.rounds or (3 if args.quick else 7)
    loop_max = args.loop_max if args.loop_max is not None else (16384 if args.quick else 65536)
    if any(s % args.group_size for s in sizes):
        parser.error("every size must be a multiple of --group-size")
    if rounds < 1:
        parser.error("--rounds must be >= 1")

    import torch
    from tqdm.auto import tqdm

    import grouprl_verl.estimators  # noqa: F401  (registers grouprl's estimators with verl)

    if args.threads:
        torch.set_num_threads(args.threads)
    machine_start = common.machine_info()
    rows = []
    for b in tqdm(sizes, desc="batch sizes"):
        token_rewards, mask, uids = make_batch(b, args.group_size, args.length, layout=args.layout,
                                               mask_dtype=args.mask_dtype)
        calls = build_calls(token_rewards, mask, uids, loop_max)
        agree = agreement(calls, token_rewards.sum(dim=-1))
        times, inner = time_rounds(calls, rounds, args.min_seconds)
        floor_ways = [n for n in times if n.startswith("floor_")]
        times["floor"] = [min(times[n][k] for n in floor_ways) for k in range(rounds)]  # fastest way, per round
        med = {n: statistics.median(t) for n, t in times.items()}
        row = {"batch_size": b, "time_s": times, "median_s": med, "min_s": {n: min(t) for n, t in times.items()},
               "calls_per_measurement": inner,
               "floor_fastest_way": min(floor_ways, key=lambda n: med[n]),
               "load_1m": os.getloadavg()[0], **agree}
        for algo, verl_paths in (("grpo", ["verl_grpo_vectorized", "verl_grpo_loop"]),
                                 ("gpg", ["verl_gpg_vectorised_equiv", "verl_gpg_loop"])):
            paths = [p for p in verl_paths if p in times]
            fastest = min(paths, key=lambda p: med[p])
            row[f"{algo}_verl_fastest"] = fastest
            for ours in (f"grouprl_{algo}_full", f"grouprl_{algo}_core_bcast"):
                row[f"{ours}_vs_verl_fastest"] = ratio_stats(times[ours], times[fastest])
                row[f"{ours}_vs_floor"] = ratio_stats(times[ours], times["floor"])
            for p in paths:
                row[f"grouprl_{algo}_full_vs_{p}"] = ratio_stats(times[f"grouprl_{algo}_full"], times[p])
        rows.append(row)
        del calls, token_rewards, mask, uids

    def ms(x):
        return f"{1e3 * x:.2f}" if x < 0.1 else f"{1e3 * x:.0f}"

    def rs(r):
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    lines = ["| B | floor (ms) | write-only (ms) | GRPO: grouprl full (ms) | core+bcast | core (B,) | verl grpo_vectorized "
             "| verl grpo loop | full / verl fastest | full / floor | GPG: grouprl full (ms) | core+bcast | core (B,) "
             "| verl gpg vectorised equiv. | verl gpg loop | full / verl fastest | full / floor |",
             "|---:" * 17 + "|"]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"| {r['batch_size']} | {ms(m['floor'])} | {ms(m['write_only'])}"
            f" | {ms(m['grouprl_grpo_full'])} | {ms(m['grouprl_grpo_core_bcast'])} | {ms(m['grouprl_grpo_core'])}"
            f" | {ms(m['verl_grpo_vectorized'])} | {ms(m['verl_grpo_loop']) if 'verl_grpo_loop' in m else 'not run'}"
            f" | {rs(r['grouprl_grpo_full_vs_verl_fastest'])} | {rs(r['grouprl_grpo_full_vs_floor'])}"
            f" | {ms(m['grouprl_gpg_full'])} | {ms(m['grouprl_gpg_core_bcast'])} | {ms(m['grouprl_gpg_core'])}"
            f" | {ms(m['verl_gpg_vectorised_equiv'])} | {ms(m['verl_gpg_loop']) if 'verl_gpg_loop' in m else 'not run'}"
            f" | {rs(r['grouprl_gpg_full_vs_verl_fastest'])} | {rs(r['grouprl_gpg_full_vs_floor'])} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    print("\nratios: median over rounds (min-max); 'verl fastest' is verl's path with the lowest median at that B:")
    for r in rows:
        print(f"  B={r['batch_size']:>7}: floor's fastest way = {r['floor_fastest_way']}; "
              f"GRPO fastest verl = {r['grpo_verl_fastest']}, GPG fastest verl = "
              f"{r['gpg_verl_fastest']}; core+bcast / floor: GRPO {rs(r['grouprl_grpo_core_bcast_vs_floor'])}, "
              f"GPG {rs(r['grouprl_gpg_core_bcast_vs_floor'])}; max |diff| GRPO vs verl "
              f"{r['grpo_vs_verl_grpo_vectorized']:.1e}, GPG (same alpha) "
              f"{r['gpg_vs_verl_gpg_vectorised_equiv_same_alpha']:.1e}; alpha paper {r['alpha_grouprl_paper']:.3f} "
              f"vs verl {r['alpha_verl_builtin']:.3f}")

    verdicts = {}
    for algo in ("grpo", "gpg"):
        worst_verl = max(rows, key=lambda r: r[f"grouprl_{algo}_full_vs_verl_fastest"]["median"])
        big = [r for r in rows if r["batch_size"] >= FLOOR_TARGET_FROM]
        worst_floor = max(big, key=lambda r: r[f"grouprl_{algo}_full_vs_floor"]["median"]) if big else None
        verdicts[algo] = {
            "never_slower_than_verl_fastest": worst_verl[f"grouprl_{algo}_full_vs_verl_fastest"]["median"] <= TARGET_VS_VERL,
            "worst_vs_verl_fastest": {"batch_size": worst_verl["batch_size"],
                                      "ratio": worst_verl[f"grouprl_{algo}_full_vs_verl_fastest"]["median"]},
            "within_floor_target": (worst_floor[f"grouprl_{algo}_full_vs_floor"]["median"] <= TARGET_VS_FLOOR)
            if worst_floor else None,
            "worst_vs_floor_from_65k": {"batch_size": worst_floor["batch_size"],
                                        "ratio": worst_floor[f"grouprl_{algo}_full_vs_floor"]["median"]}
            if worst_floor else None,
        }
        v = verdicts[algo]
        print(f"\n{algo.upper()} targets: <= {TARGET_VS_VERL:.1f}x verl's fastest at every B -> "
              f"{'met' if v['never_slower_than_verl_fastest'] else 'NOT met'} (worst {v['worst_vs_verl_fastest']['ratio']:.2f}x "
              f"at B={v['worst_vs_verl_fastest']['batch_size']}); <= {TARGET_VS_FLOOR}x floor at B >= {FLOOR_TARGET_FROM} -> "
              + ("not measured (no such B)" if v["within_floor_target"] is None else
                 f"{'met' if v['within_floor_target'] else 'NOT met'} (worst {v['worst_vs_floor_from_65k']['ratio']:.2f}x "
                 f"at B={v['worst_vs_floor_from_65k']['batch_size']})"))

    out = Path(args.out)
    tag = "advantage_scale_quick" if args.quick else "advantage_scale"
    payload = {"config": {**vars(args), "sizes": sizes, "rounds": rounds, "loop_max": loop_max},
               "machine": machine_start, "loadavg_end": os.getloadavg(), "rows": rows, "table": table,
               "targets": {"vs_verl_fastest": TARGET_VS_VERL, "vs_floor": TARGET_VS_FLOOR,
                           "floor_from_batch_size": FLOOR_TARGET_FROM, "verdicts": verdicts}}
    json_path = common.write_json(f"{tag}.json", payload, out)
    plot(rows, args, out / f"{tag}.png")
    print(f"\n{json_path}\n{out / (tag + '.png')}")
    return payload


def plot(rows, args, path: Path) -> None:
    plt = common.pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bs = [r["batch_size"] for r in rows]
    for key, label, style in [("floor", "floor: fresh (B, L) output, one fused write", "k-"),
                              ("grouprl_grpo_full", "grouprl GRPO (registered estimator)", "C0-o"),
                              ("grouprl_gpg_full", "grouprl GPG (registered estimator)", "C1-o"),
                              ("verl_grpo_vectorized", "verl grpo_vectorized", "C2--s"),
                              ("verl_gpg_vectorised_equiv", "verl GPG from vectorised parts", "C3--s"),
                              ("verl_grpo_loop", "verl grpo (loop)", "C2:^"),
                              ("verl_gpg_loop", "verl gpg (loop)", "C3:^")]:
        pts = [(r["batch_size"], r["median_s"][key]) for r in rows if key in r["median_s"]]
        if pts:
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("batch size B (samples)")
    ax.set_ylabel("seconds per call (median over rounds)")
    ax.set_title(f"Advantage estimators, G={args.group_size}, L={args.length}")
    ax.legend(fontsize=7)
    for algo, color in (("grpo", "C0"), ("gpg", "C1")):
        ax2.semilogx(bs, [r[f"grouprl_{algo}_full_vs_floor"]["median"] for r in rows], f"{color}-o",
                     label=f"grouprl {algo.upper()} / floor")
        ax2.semilogx(bs, [r[f"grouprl_{algo}_full_vs_verl_fastest"]["median"] for r in rows], f"{color}--s",
                     label=f"grouprl {algo.upper()} / verl fastest")
    ax2.axhline(TARGET_VS_FLOOR, color="grey", linestyle=":", label=f"{TARGET_VS_FLOOR}x floor target (B >= 65k)")
    ax2.axhline(TARGET_VS_VERL, color="black", linestyle=":", linewidth=0.8, label="1.0x verl fastest target")
    ax2.set_xlabel("batch size B (samples)")
    ax2.set_ylabel("time ratio (median of per-round ratios)")
    ax2.set_title("grouprl full call vs the floor and verl's fastest path")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
