"""GCPO-guidance credit maps: one HTML page per logged step showing where the token credit went.

GCPO-guidance gives token ``t`` of completion ``i`` the advantage ``A_i * w_it``: ``A_i`` is the
completion's group-relative advantage and ``w_it`` (mean 1 over the completion) grows with the k3
divergence ``d_it`` between the policy with the positive and with the negative guidance prompt.
The page shows that product for a few prompts of the batch:

* it picks prompts whose completions have *different* rewards (a group with equal rewards has
  ``A = 0`` and carries no credit), so a rewarded and an unrewarded completion are side by side;
* each completion shows its reward and advantage;
* each token is shaded blue (``A > 0``: pushed up) or red (``A < 0``: pushed down), darker for a
  larger weight, with the weight written under it; hovering shows ``w`` and ``d``.

:func:`write_credit_map` writes ``step_{N:06d}.html`` where ``N`` is the step number as the logs
name it. Nothing here imports torch: inputs are lists (tensors work through ``tolist``).

``python -m grouprl_trl.credit_map --example DIR`` writes the page of a small hand-made batch;
``--train DIR`` trains :class:`grouprl_trl.GuidanceGCPOTrainer` on the embedded tiny model for a
few CPU steps and writes the page of its last step (the one in ``docs/credit_map.png``).
"""

from __future__ import annotations

import argparse
import html
from pathlib import Path

POSITIVE_RGB = (33, 102, 172)  # blue: A > 0
NEGATIVE_RGB = (178, 24, 43)  # red: A < 0
NEUTRAL_RGB = (120, 120, 120)  # A = 0

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:20px 24px;color:#222;
     background:#fff;max-width:1180px}
h1{font-size:20px;margin:0 0 2px}
.sub{color:#555;font-size:13px;margin:0 0 10px}
.legend{display:flex;gap:22px;align-items:center;font-size:13px;margin:6px 0 14px;flex-wrap:wrap;
        padding:8px 10px;background:#f7f7f7;border-radius:6px}
.sw{display:inline-block;width:54px;height:14px;border-radius:3px;vertical-align:middle;margin-right:6px}
.group{border:1px solid #d9d9d9;border-radius:8px;padding:8px 12px 4px;margin:0 0 14px}
.prompt{font-size:13px;color:#333;margin:0 0 4px}
.row{display:flex;gap:12px;align-items:flex-start;padding:7px 0;border-top:1px solid #eee}
.meta{flex:0 0 138px;font-size:12px;line-height:1.6}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-weight:600}
.toks{display:flex;flex-wrap:wrap;gap:3px 2px;align-items:flex-start}
.t{display:inline-flex;flex-direction:column;align-items:center;border-radius:3px;padding:1px 3px 0;min-width:12px}
.t .s{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:14px;white-space:pre;
      line-height:18px}
.t .w{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:9.5px;line-height:11px;opacity:.9}
.foot{color:#666;font-size:12px;margin-top:6px}
"""


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def select_groups(rewards, group_ids, max_groups: int = 3) -> list:
    """Groups (in batch order) whose completions have different rewards, at most ``max_groups``."""
    rewards, group_ids = _as_list(rewards), _as_list(group_ids)
    by_group: dict = {}
    for reward, group in zip(rewards, group_ids, strict=True):
        by_group.setdefault(group, []).append(float(reward))
    mixed = [g for g, rs in by_group.items() if max(rs) - min(rs) > 1e-9]
    return mixed[:max_groups]


def _rows_of_group(rows: list[int], rewards: list[float], max_per_group: int) -> list[int]:
    """The group's completions, best reward first; when there are too many, the best and the worst ones."""
    ordered = sorted(rows, key=lambda i: (-rewards[i], i))
    if len(ordered) <= max_per_group:
        return ordered
    top = (max_per_group + 1) // 2
    return ordered[:top] + ordered[len(ordered) - (max_per_group - top):]


def _colour(advantage: float) -> tuple[int, int, int]:
    if advantage > 0:
        return POSITIVE_RGB
    if advantage < 0:
        return NEGATIVE_RGB
    return NEUTRAL_RGB


def _token_text(token: str) -> str:
    text = token.replace("\n", "\u21b5").replace("\t", "\u21e5")
    return html.escape(text) if text.strip() else html.escape(text.replace(" ", "\u00b7")) or "\u2205"


def _token_cell(token: str, weight: float, divergence: float, rgb, top_weight: float) -> str:
    alpha = 0.06 + 0.84 * min(max(weight, 0.0) / top_weight, 1.0) if top_weight > 0 else 0.06
    ink = "#fff" if alpha > 0.55 else "#111"
    r, g, b = rgb
    return (f"<span class='t' style='background:rgba({r},{g},{b},{alpha:.2f});color:{ink}' "
            f"title='w = {weight:.3f}, d = {divergence:.4f}'><span class='s'>{_token_text(token)}</span>"
            f"<span class='w'>{weight:.1f}</span></span>")


def render_credit_map(*, completions, weights, divergences, rewards, advantages, group_ids, step: int,
                      prompts=None, max_groups: int = 3, max_per_group: int = 6,
                      title: str = "GCPO-guidance token credit") -> str:
    """The HTML page (see the module docstring).

    ``completions``: one list of token strings per completion (completion tokens only, padding
    removed); ``weights`` / ``divergences``: one list of per-token floats per completion, aligned
    with its tokens; ``rewards``, ``advantages``, ``group_ids``: one value per completion (the
    group id says which completions share a prompt); ``prompts``: the prompt text per completion
    (optional); ``step``: the step number as the logs name it.
    """
    completions = [_as_list(c) for c in _as_list(completions)]
    weights = [[float(x) for x in _as_list(w)] for w in _as_list(weights)]
    divergences = [[float(x) for x in _as_list(d)] for d in _as_list(divergences)]
    rewards = [float(r) for r in _as_list(rewards)]
    advantages = [float(a) for a in _as_list(advantages)]
    group_ids = _as_list(group_ids)
    n = len(completions)
    for name, values in (("weights", weights), ("divergences", divergences), ("rewards", rewards),
                         ("advantages", advantages), ("group_ids", group_ids)):
        if len(values) != n:
            raise ValueError(f"credit map: {name} has {len(values)} entries for {n} completions")
    for i in range(n):
        if not len(completions[i]) == len(weights[i]) == len(divergences[i]):
            raise ValueError(f"credit map: completion {i} has {len(completions[i])} tokens, {len(weights[i])} "
                             f"weights and {len(divergences[i])} divergences")

    chosen = select_groups(rewards, group_ids, max_groups)
    shown = {g: _rows_of_group([i for i in range(n) if group_ids[i] == g], rewards, max_per_group) for g in chosen}
    top_weight = max((w for g in chosen for i in shown[g] for w in weights[i]), default=1.0)
    pos, neg = ",".join(map(str, POSITIVE_RGB)), ",".join(map(str, NEGATIVE_RGB))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}, step {step}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)} &middot; step {step}</h1>",
        "<p class='sub'>Token t of completion i is trained with the advantage A<sub>i</sub> &times; "
        "w<sub>it</sub>; the weight w (mean 1 over a completion) grows with the divergence d between the "
        "policy under the positive and under the negative guidance prompt.</p>",
        "<div class='legend'>",
        f"<span><span class='sw' style='background:linear-gradient(90deg,rgba({pos},.08),rgba({pos},.9))'></span>"
        "A &gt; 0: pushed up</span>",
        f"<span><span class='sw' style='background:linear-gradient(90deg,rgba({neg},.08),rgba({neg},.9))'></span>"
        "A &lt; 0: pushed down</span>",
        "<span>shade and the number under a token: its weight w (darker = more credit)</span>",
        "<span>hover: w and d</span></div>",
    ]
    if not chosen:
        parts.append("<p><b>No prompt in this batch has completions with different rewards: every advantage is 0 "
                     "and no token gets credit.</b></p>")
    for g in chosen:
        rows = shown[g]
        members = [i for i in range(n) if group_ids[i] == g]
        group_rewards = " / ".join(f"{rewards[i]:g}" for i in sorted(members, key=lambda i: (-rewards[i], i)))
        prompt = ""
        if prompts is not None:
            prompt = f"<b>prompt</b> {html.escape(str(_as_list(prompts)[rows[0]]))} &nbsp;&middot;&nbsp; "
        hidden = len(members) - len(rows)
        more = f" &nbsp;&middot;&nbsp; {hidden} more not shown" if hidden else ""
        parts.append(f"<div class='group'><p class='prompt'>{prompt}<b>rewards</b> {group_rewards}{more}</p>")
        for i in rows:
            rgb = _colour(advantages[i])
            cells = "".join(_token_cell(t, w, d, rgb, top_weight)
                            for t, w, d in zip(completions[i], weights[i], divergences[i], strict=True))
            parts.append(
                f"<div class='row'><div class='meta'>reward <b>{rewards[i]:.2f}</b><br>"
                f"<span class='badge' style='background:rgb{rgb}'>A = {advantages[i]:+.3f}</span><br>"
                f"{len(completions[i])} tokens</div><div class='toks'>{cells}</div></div>"
            )
        parts.append("</div>")
    groups = len(dict.fromkeys(group_ids))
    parts.append(f"<p class='foot'>Step {step}: {n} completions in {groups} groups; shown: {len(chosen)} group(s) "
                 "whose completions have different rewards (equal rewards give A = 0 and no credit).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def credit_map_path(directory, step: int) -> Path:
    """``directory/step_{step:06d}.html``."""
    return Path(directory) / f"step_{step:06d}.html"


def write_credit_map(directory, step: int, **batch) -> Path:
    """Render (:func:`render_credit_map`, keyword arguments) and write ``step_{step:06d}.html`` into
    ``directory`` (created); returns the path."""
    path = credit_map_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_credit_map(step=step, **batch), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- example page
def example_batch() -> dict:
    """A hand-made batch of two prompts x 4 completions: maths-like tokens, weights from GCPO's rank rule."""
    import torch

    from grouprl_core.guidance import rank_weights

    texts = {
        0: ("What is 17 x 3?", [
            (["17", " x", " 3", " =", " 17", " x", " 2", " +", " 17", " =", " 34", " +", " 17", " =", " 51",
              ".", " Answer", ":", " \\boxed{", "51", "}"], 1.0),
            (["3", " x", " 17", " is", " 3", " x", " 10", " +", " 3", " x", " 7", " =", " 30", " +", " 21",
              " =", " 51", ".", " \\boxed{", "51", "}"], 1.0),
            (["17", " x", " 3", " =", " 17", " +", " 17", " =", " 34", ".", " Answer", ":", " \\boxed{", "34",
              "}"], 0.0),
            (["17", " x", " 3", " =", " 41", ".", " \\boxed{", "41", "}"], 0.0),
        ]),
        1: ("Simplify 6/8.", [
            (["Divide", " both", " by", " 2", ":", " 3", "/", "4", ".", " \\boxed{", "3/4", "}"], 1.0),
            (["6", "/", "8", " =", " 0", ".", "75", " =", " 3", "/", "4", ".", " \\boxed{", "3/4", "}"], 1.0),
            (["Divide", " by", " 3", ":", " 2", "/", "8", ".", " \\boxed{", "2/8", "}"], 0.0),
            (["6", "/", "8", " is", " already", " simple", ".", " \\boxed{", "6/8", "}"], 0.0),
        ]),
    }
    # hand-set divergences: the tokens that decide the answer differ most between the two guidance prompts
    decisive = {"51", "34", "41", "3/4", "2/8", "6/8", " 2", " 51", " 34", " 41", " 21", " 3", " 7", " already",
                " 0", "75", " by", " simple", "4"}
    completions, divergences, rewards, group_ids, prompts = [], [], [], [], []
    for group, (prompt, members) in texts.items():
        for k, (tokens, reward) in enumerate(members):
            completions.append(tokens)
            divergences.append([(1.2 if t in decisive else 0.05) + 0.02 * ((j * 7 + k) % 5)
                                for j, t in enumerate(tokens)])
            rewards.append(reward)
            group_ids.append(group)
            prompts.append(prompt)
    width = max(len(t) for t in completions)
    scores = torch.zeros(len(completions), width)
    mask = torch.zeros(len(completions), width)
    for i, d in enumerate(divergences):
        scores[i, : len(d)] = torch.tensor(d)
        mask[i, : len(d)] = 1
    weights = rank_weights(scores, mask)
    weights = [weights[i, : len(t)].tolist() for i, t in enumerate(completions)]
    advantages = []
    for i, g in enumerate(group_ids):  # group-relative: (r - mean) / std of the group
        group = torch.tensor([rewards[j] for j in range(len(rewards)) if group_ids[j] == g])
        advantages.append(float((rewards[i] - group.mean()) / (group.std() + 1e-6)))
    return dict(completions=completions, weights=weights, divergences=divergences, rewards=rewards,
                advantages=advantages, group_ids=group_ids, prompts=prompts)


def starts_with_a_digit(completions, **kwargs) -> list[float]:
    """Toy reward for the training example: 1.0 when the completion's first character is a digit
    (about a quarter of a fresh tiny model's completions, so groups mix right and wrong)."""
    return [float(str(c)[:1].isdigit()) for c in completions]


def train_example(directory, steps: int = 4) -> Path:
    """Train GuidanceGCPOTrainer on the tiny model and toy prompts for ``steps`` CPU steps with
    ``credit_map_every=steps``; returns the page of step ``steps``."""
    from grouprl_trl import GuidanceGCPOConfig, GuidanceGCPOTrainer
    from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

    tok = build_tokenizer()
    args = GuidanceGCPOConfig(
        output_dir=str(directory), use_cpu=True, report_to="none", bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=16, num_generations=4, max_completion_length=12, learning_rate=2e-3,
        max_steps=steps, credit_map_every=steps, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
    )
    trainer = GuidanceGCPOTrainer(model=build_tiny_model(tok, seed=0), reward_funcs=starts_with_a_digit, args=args,
                                  train_dataset=build_toy_dataset(num_rows=128, seed=0), processing_class=tok)
    trainer.train()
    return credit_map_path(Path(directory) / "credit_maps", steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grouprl_trl.credit_map",
                                     description="Write a credit map: of a small hand-made batch (--example) or of "
                                                 "a short GCPO-guidance run on the tiny model (--train).")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--example", metavar="DIR", help="output folder for the hand-made batch's page")
    where.add_argument("--train", metavar="DIR", help="output_dir of the tiny training run (CPU, about a minute)")
    parser.add_argument("--step", type=int, default=None, help="--example: step number on the page (3); "
                                                               "--train: steps to train (4)")
    args = parser.parse_args(argv)
    if args.train:
        print(train_example(args.train, args.step or 4))
    else:
        print(write_credit_map(args.example, args.step or 3, **example_batch()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
