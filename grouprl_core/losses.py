"""Per-token policy losses and their aggregation into a scalar.

Loss matrices are ``(B, T)`` (one row per completion, one column per completion token) and
are combined with a ``(B, T)`` mask. Aggregation modes are named as verl names them
(``verl.trainer.ppo.core_algos.agg_loss``, 0.9.1), so a verl user reads the same words:

- ``token-mean``:              sum_{i,t} m_it l_it / N_tok                (N_tok: tokens of the global batch)
- ``token-sum``:               sum_{i,t} m_it l_it
- ``seq-mean-token-mean``:     (1/N_seq) sum_i [ sum_t m_it l_it / sum_t m_it ]
- ``seq-mean-token-sum``:      (1/N_seq) sum_i  sum_t m_it l_it
- ``seq-mean-token-sum-norm``: (1/N_seq) sum_i  sum_t m_it l_it / L    (L: a fixed horizon, default T)

``N_tok`` and ``N_seq`` default to this micro-batch's counts. When a batch is split over
micro-batches or processes, pass the *global* counts (and ``dp_size`` when gradients are
averaged over data-parallel ranks, as DDP/FSDP do) so the sum of the pieces equals the loss
of the whole batch. Sequences with no valid token are excluded from ``N_seq``.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_token_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    total_tokens: float | torch.Tensor | None = None,
    total_seqs: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    dp_size: int = 1,
) -> torch.Tensor:
    """Aggregate a ``(B, T)`` per-token loss into a scalar; formulas in the module docstring.

    ``dp_size`` multiplies the result, because DDP/FSDP *average* gradients over ranks while
    the global normaliser already divides by the whole batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss aggregation mode {mode!r} is not one of {AGG_MODES}")
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = m.sum() if total_tokens is None else total_tokens
        if torch.is_tensor(denom):
            denom = denom.to(loss_mat.dtype).clamp(min=1.0)
        else:
            denom = max(float(denom), 1.0)
        return (loss_mat * m).sum() / denom * dp_size
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    tokens_per_seq = m.sum(-1)
    seq_valid = (tokens_per_seq > 0).to(loss_mat.dtype)
    if mode == "seq-mean-token-mean":
        seq_loss = (loss_mat * m).sum(-1) / tokens_per_seq.clamp(min=1.0)
    else:
        seq_loss = (loss_mat * m).sum(-1)
        if mode == "seq-mean-token-sum-norm":
            seq_loss = seq_loss / float(norm_length if norm_length is not None else loss_mat.shape[-1])
    denom = seq_valid.sum() if total_seqs is None else total_seqs
    if torch.is_tensor(denom):
        denom = denom.to(loss_mat.dtype).clamp(min=1.0)
    else:
        denom = max(float(denom), 1.0)
    return (seq_loss * seq_valid).sum() / denom * dp_size


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Plain policy-gradient (REINFORCE) per-token loss, GPG eq. 5: ``l_it = -log pi(o_it) * A_it``.

    No importance ratio, no clipping, no KL. ``advantages`` is ``(B,)``, ``(B, 1)`` or ``(B, T)``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return -logp * advantages


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO sequence log-ratio, ``log s_i = (1/|o_i|) sum_t (log pi_theta - log pi_old)``, as ``(B, 1)``."""
    m = mask.to(logp.dtype)
    return (((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """PPO importance ratio: per token ``exp(log pi_theta - log pi_old)`` as ``(B, T)`` (``level="token"``),
    or GSPO's per sequence ``s_i = exp(mean_t(log pi_theta - log pi_old))`` as ``(B, 1)`` (``"sequence"``)."""
    if level == "sequence":
        return torch.exp(sequence_log_ratio(logp, old_logp, mask))
    if level == "token":
        return torch.exp(logp - old_logp)
    raise ValueError(f"importance sampling level must be 'token' or 'sequence', got {level!r}")


def clipped_surrogate_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> torch.Tensor:
    """PPO clipped surrogate per token, with optional clip-higher and dual clip.

    l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    dual clip (Ye et al. 2020), only where A < 0:  l = min(l, -c * A)
    ``ratio`` broadcasts against ``advantages`` (token ``(B, T)`` or sequence ``(B, 1)`` ratios).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    clip_high = clip_low if clip_high is None else clip_high
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) (Schulman's estimator, as TRL's and verl's ``low_var_kl``
    without clamping): ``exp(ref - logp) - (ref - logp) - 1``, >= 0, zero where the two agree."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1
