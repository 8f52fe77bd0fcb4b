"""GCPO-guidance: "Guidance Contrastive Token Credit Assignment for Discrete Policy
Optimization" (Li et al., arXiv 2605.29198; official code jacklishufan/gcpo, an EasyR1 fork,
``dp_actor.py``). Formulas follow the official code.

The sampled completion's tokens are scored under the positive context c+ (the prompt) and a
negative context c- (the prompt plus "intentionally answer wrongly"), with the current policy
and temperature-scaled logits; tokens whose probability the negative instruction changes
most get the most credit:

    Delta_t = clamp(l-_t - l+_t, -20, 20)
    d_t     = clamp(exp(Delta_t) - Delta_t - 1, -10, 10)           (k3 estimator, >= 0)
    per sequence i with N_i valid tokens, rank_t in 1..N_i ascending in d (ties: position order)
    p_t     = rank_t / N_i
    w_t     = p_t ** a,   a = ln(1 - y) / ln(1 - x) - 1             (x = 0.4, y = 0.8: a ~ 2.1507;
                                                                   the top 40% of tokens carry 80% of the mass)
    w_t    <- N_i w_t / sum_t w_t                                   (mean 1 over the sequence)
    A_it    = A_i * w_t                                             (weights detached)

A_i is GRPO's group advantage; the base loss is DAPO-like (clip 0.2/0.28, token-mean, no KL),
with groups of mean accuracy <= 0.01 or >= 0.99 dropped (:func:`dynamic_filter_keep`).
The negative context itself is built by :func:`build_negative_prompt` (plain Python, shared by
the TRL and verl adapters).
"""

from __future__ import annotations

import math

import torch

from .groups import group_stats

DELTA_CLAMP = 20.0
DIVERGENCE_CLAMP = 10.0
NEGATIVE_PROMPT_TYPES = ("wrong_answer", "empty_prompt", "custom")
FILTER_LOW, FILTER_HIGH = 0.01, 0.99  # dynamic filter: keep groups whose mean accuracy is inside (low, high)
DEFAULT_RANK_X, DEFAULT_RANK_Y = 0.4, 0.8  # the top 40% of tokens carry 80% of the weight
DEFAULT_CLIP_HIGH = 0.28  # DAPO clip-higher (the lower clip stays 0.2)
DEFAULT_DUAL_CLIP = 3.0
WRONG_ANSWER_SUFFIX = "\n\nNote: Intentionally generate an incorrect answer."
EMPTY_PROMPT = "answer the question"  # the official code's fallback for a context without the question


def rank_power_exponent(x: float = DEFAULT_RANK_X, y: float = DEFAULT_RANK_Y) -> float:
    """a = ln(1 - y) / ln(1 - x) - 1, so that the top ``x`` of tokens carry ``y`` of the weight."""
    if not (0.0 < x < 1.0 and 0.0 < y < 1.0):
        raise ValueError(f"rank_x and rank_y must be in (0, 1), got x={x}, y={y}")
    return math.log(1.0 - y) / math.log(1.0 - x) - 1.0


def k3_divergence(logp_neg: torch.Tensor, logp_pos: torch.Tensor) -> torch.Tensor:
    """Per-token ``clamp(exp(D) - D - 1, -10, 10)`` with ``D = clamp(l- - l+, -20, 20)``."""
    delta = torch.clamp(logp_neg - logp_pos, -DELTA_CLAMP, DELTA_CLAMP)
    return torch.clamp(torch.exp(delta) - delta - 1.0, -DIVERGENCE_CLAMP, DIVERGENCE_CLAMP)


@torch.no_grad()
def rank_weights(scores: torch.Tensor, mask: torch.Tensor, x: float = DEFAULT_RANK_X, y: float = DEFAULT_RANK_Y) -> torch.Tensor:
    """(B, T) per-sequence rank weights ``N_i p^a / sum p^a`` (0 on masked tokens)."""
    valid = mask.bool()
    n_valid = valid.sum(-1, keepdim=True)
    # masked tokens sort after every valid one; a stable sort breaks ties by position
    keyed = torch.where(valid, scores.to(torch.float64), torch.full_like(scores, torch.inf, dtype=torch.float64))
    order = torch.argsort(keyed, dim=-1, stable=True)
    positions = torch.arange(1, scores.size(-1) + 1, device=scores.device, dtype=torch.float64)
    ranks = torch.empty_like(keyed).scatter_(-1, order, positions.expand_as(keyed).contiguous())
    p = ranks / n_valid.clamp(min=1).to(torch.float64)
    w = torch.where(valid, p.pow(rank_power_exponent(x, y)), torch.zeros_like(p))
    w = n_valid.to(torch.float64) * w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    return w.to(scores.dtype)


@torch.no_grad()
def guidance_token_weights(
    logp_pos: torch.Tensor, logp_neg: torch.Tensor, mask: torch.Tensor, x: float = DEFAULT_RANK_X, y: float = DEFAULT_RANK_Y
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token credit weights and the k3 divergence, both (B, T); see the module docstring."""
    divergence = k3_divergence(logp_neg, logp_pos)
    return rank_weights(divergence, mask, x, y), divergence


def token_level_advantages(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``A_it = A_i * w_it`` as (B, T)."""
    return advantages.reshape(-1, 1) * weights


def dynamic_filter_keep(
    accuracy: torch.Tensor, group_ids: torch.Tensor, low: float = FILTER_LOW, high: float = FILTER_HIGH
) -> torch.Tensor:
    """(B,) bool: keep samples whose group's mean accuracy is strictly inside (low, high)."""
    mean = group_stats(accuracy.to(torch.float32), group_ids).mean
    return (mean > low) & (mean < high)


# ----------------------------------------------------------------------------- negative context
def _last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise ValueError("a conversational prompt needs at least one user message to build the negative context")


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def build_negative_prompt(prompt, negative_prompt_type: str = "wrong_answer", negative_template: str | None = None):
    """The negative context c- for one dataset prompt (a string, or a list of chat messages).

    - ``wrong_answer``: the prompt with ``"\\n\\nNote: Intentionally generate an incorrect answer."``
      appended once (to the last user message of a conversation);
    - ``empty_prompt``: a prompt without the question, ``"answer the question"`` (a conversation
      keeps its system messages);
    - ``custom``: ``negative_template.format(prompt=<the prompt text / last user message>)``.
    The input is not modified.
    """
    if negative_prompt_type not in NEGATIVE_PROMPT_TYPES:
        raise ValueError(f"negative_prompt_type must be one of {NEGATIVE_PROMPT_TYPES}, got {negative_prompt_type!r}")
    if negative_prompt_type == "custom" and negative_template is None:
        raise ValueError("negative_prompt_type='custom' needs negative_template (a format string with {prompt})")
    if isinstance(prompt, str):
        if negative_prompt_type == "wrong_answer":
            return prompt + WRONG_ANSWER_SUFFIX
        if negative_prompt_type == "empty_prompt":
            return EMPTY_PROMPT
        return negative_template.format(prompt=prompt)

    messages = [dict(m) for m in prompt]
    if negative_prompt_type == "empty_prompt":
        return [m for m in messages if m.get("role") == "system"] + [{"role": "user", "content": EMPTY_PROMPT}]
    i = _last_user_index(messages)
    content = messages[i]["content"]
    if negative_prompt_type == "wrong_answer":
        if isinstance(content, str):
            messages[i]["content"] = content + WRONG_ANSWER_SUFFIX
        else:
            messages[i]["content"] = [*content, {"type": "text", "text": WRONG_ANSWER_SUFFIX}]
    else:
        messages[i]["content"] = negative_template.format(prompt=_message_text(content))
    return messages
