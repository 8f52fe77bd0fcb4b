"""GCPO-gold: "Group Contrastive Policy Optimization: When Contrast Fails, Go Gold"
(Wu & Liu, arXiv 2510.07790). No official code is public; this is our proposal, written down
in ``docs/algorithms.md`` (GCPO-gold), and says so.

When every rollout of a prompt is wrong, the group has no contrast and GRPO learns nothing
from it. GCPO-gold puts the dataset's reference ("gold") solution into such a group as a
correct member, so the group gets a signal:

    trigger(g) = "all_wrong": no member of g is correct and g has a reference solution
                 "always":    g has a reference solution
                 "never":     never
    placement  = "replace": the gold completion replaces the group's last rollout
                 "append":  the gold completion is added as member G+1

The gold completion is then scored by the same reward functions (never assumed correct) and
the advantages are recomputed with GRPO's ``(r - mean_g) / (std_g + eps)``
(:func:`grouprl_core.grpo.grpo_advantages`). Its old log-probs come from the normal
old-log-prob pass over the batch that already holds it; the loss is GSPO's clipped sequence
ratio (no KL) by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRIGGERS = ("all_wrong", "always", "never")
PLACEMENTS = ("replace", "append")
# An answer-only reference rendered as a completion the math rewards accept (a think block and a
# boxed answer); use "{solution}" when the reference column already holds a full completion.
DEFAULT_GOLD_TEMPLATE = "<think>\n{solution}\n</think>\n\\boxed{{{solution}}}"
DEFAULT_CORRECT_THRESHOLD = 1.0  # a rollout is correct when its reward >= this


def check_gold_template(template: str, where: str = "gold_template") -> None:
    """Raise a ValueError naming ``where`` unless ``template`` is a format string whose only field is
    ``{solution}`` (literal braces doubled)."""
    if not isinstance(template, str) or "{solution}" not in template:
        raise ValueError(f"{where} must contain the placeholder '{{solution}}', got {template!r}")
    marker = "\x00solution\x00"
    try:
        rendered = template.format(solution=marker)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"{where} {template!r} is not a valid format string with only {{solution}} ({err!r}); "
            "double literal braces, e.g. '\\\\boxed{{{solution}}}'."
        ) from err
    if marker not in rendered:  # e.g. '{{solution}}' is a literal, not the placeholder
        raise ValueError(f"{where} {template!r} never inserts the reference: its {{solution}} is escaped")


def render_gold(template: str, reference) -> str | None:
    """The gold completion text for one row, or None when the row has no reference.

    A reference that is None, or empty / whitespace after ``strip()``, means "no gold". Numbers
    are rendered with ``str``; any other type is a TypeError (point the reference column at text).
    """
    if reference is None:
        return None
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if not isinstance(reference, str):
        raise TypeError(
            f"reference solutions must be strings (or numbers), got {type(reference).__name__}: {reference!r}. "
            "Point the reference column (GCPOConfig.reference_column / gcpo.solution_key) at a text column."
        )
    if not reference.strip():
        return None
    return template.format(solution=reference)


@dataclass
class GoldPlan:
    groups: torch.Tensor  # (K,) ids of the groups that receive a gold member
    replace_index: torch.Tensor  # (K,) sample index replaced in each group ("replace"), -1 for "append"
    anchor_index: torch.Tensor  # (K,) each group's last member: the replaced sample, or the one the gold follows

    @property
    def num_injected(self) -> int:
        return int(self.groups.numel())


def all_wrong_groups(correct: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(num_groups,) bool: True for groups with no correct member."""
    num_groups = int(group_ids.max()) + 1
    any_correct = torch.zeros(num_groups, dtype=torch.bool, device=correct.device)
    any_correct = any_correct.scatter_reduce(0, group_ids.long(), correct.bool(), reduce="amax")
    return ~any_correct


def plan_gold_injection(
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    has_gold: torch.Tensor,
    *,
    trigger: str = "all_wrong",
    placement: str = "replace",
) -> GoldPlan:
    """Which groups get the gold completion, and which sample it replaces.

    Args:
        correct: (B,) bool, rollout i is correct (its reward reaches the "correct" threshold).
        group_ids: (B,) group of each rollout.
        has_gold: (B,) bool, the prompt of rollout i has a non-empty reference solution
            (constant within a group).
        trigger, placement: see the module docstring.
    Returns:
        a :class:`GoldPlan`; for "replace" the replaced sample is the group's last member
        (highest sample index), for "append" ``replace_index`` is -1. ``anchor_index`` is the
        group's last member in both cases (with "append" the gold member joins the process /
        position of that sample).
    """
    if trigger not in TRIGGERS:
        raise ValueError(f"gold_trigger must be one of {TRIGGERS}, got {trigger!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"gold_placement must be one of {PLACEMENTS}, got {placement!r}")
    gid = group_ids.long()
    num_groups = int(gid.max()) + 1
    group_has_gold = torch.zeros(num_groups, dtype=torch.bool, device=gid.device)
    group_has_gold = group_has_gold.scatter_reduce(0, gid, has_gold.bool(), reduce="amax")
    if trigger == "never":
        chosen = torch.zeros(num_groups, dtype=torch.bool, device=gid.device)
    elif trigger == "always":
        chosen = group_has_gold
    else:
        chosen = group_has_gold & all_wrong_groups(correct, gid)
    groups = chosen.nonzero().flatten()
    last = torch.full((num_groups,), -1, dtype=torch.long, device=gid.device)
    last = last.scatter_reduce(0, gid, torch.arange(gid.numel(), device=gid.device), reduce="amax")
    anchor = last[groups]
    if placement == "append":
        return GoldPlan(groups=groups, replace_index=torch.full_like(groups, -1), anchor_index=anchor)
    return GoldPlan(groups=groups, replace_index=anchor, anchor_index=anchor)


def fit_gold_completion(
    token_ids: list[int], eos_token_id: int, max_completion_length: int | None
) -> tuple[list[int], bool]:
    """Make the tokens of a gold completion look like a sampled completion.

    A sampled completion either ends with EOS (it stopped) or has exactly
    ``max_completion_length`` tokens and no EOS (it was cut). The gold text's tokens get the
    same treatment:

        len(ids) + 1 <= L:  ids + [eos]          (not truncated)
        otherwise:          ids[:L]              (truncated, no EOS)

    ``L = None`` means no limit. Returns ``(ids, truncated)``.
    """
    ids = [int(t) for t in token_ids]
    if max_completion_length is None or len(ids) + 1 <= max_completion_length:
        return ids + [int(eos_token_id)], False
    return ids[:max_completion_length], True
