"""DataProto-level steps that verl's registries cannot express (pure functions, testable on CPU).

verl (0.9.1) gives a registered estimator only ``token_level_rewards``, ``response_mask``, ``uid``
and ``config.algorithm``, and a registered loss only log-probs, ``advantages`` and masks. The
algorithms need a little more; each piece below works on the legacy trainer's ``DataProto``
(``verl.trainer.ppo.ray_trainer.RayPPOTrainer.fit``) and is called by
:class:`grouprl_verl.trainer.GroupRLRayPPOTrainer` at the point named in its docstring:

* GCPO-gold: :func:`inject_gold` rewrites one rollout of every all-wrong group with the reference
  solution after rewards, before old log-probs.

Every rule both backends share (gold rendering and fitting, COPO's answer keys, the GPG batch
planner) and every metric name comes from grouprl_core, so verl and the TRL trainers decide and log
the same things.
* GPG: :class:`GPGGroupAssembler` keeps valid groups across generation rounds (beta_th threshold)
  and carries leftovers to the next step, after rewards, before old log-probs.
* COPO: :func:`attach_copo_fields` computes the global advantage and the gate from the groups'
  extracted answers (``reward_extra_info``), before the actor update.
* GCPO-guidance: :func:`guidance_filter`, :func:`negative_context_batch` and
  :func:`apply_guidance_weights` drop extreme groups and weight the advantages by the
  negative-context token credit, before the actor update.

Row layout (verl's agent loop): ``prompts`` (B, Lp) left-padded, ``responses`` (B, Lr) right-padded,
``input_ids``/``attention_mask``/``position_ids`` = prompt then response (B, Lp + Lr),
``response_mask`` (B, Lr), ``rm_scores`` (B, Lr) with the outcome reward on the last response token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from verl import DataProto

from grouprl_core import names
from grouprl_core.copo import answer_keys, copo_advantages, copo_blend_weight, encode_answers, normalise_answer
from grouprl_core.gold import fit_gold_completion, plan_gold_injection
from grouprl_core.gpg import gpg_needs_more, group_valid_flags, plan_gpg_batch, usable_valid_groups
from grouprl_core.guidance import dynamic_filter_keep, guidance_token_weights

from .config import COPOOptions, GCPOOptions, GPGOptions, GuidanceOptions
from .estimators import group_ids_from_index


_WARNED: set[str] = set()  # warnings already shown in this process (the trainer runs in one process)


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def batch_group_ids(data: DataProto, who: str) -> torch.Tensor:
    return group_ids_from_index(data.non_tensor_batch.get("uid"), len(data), who)


def outcome_rewards(data: DataProto) -> torch.Tensor:
    """(B,) outcome reward: ``token_level_scores`` once the trainer set it, else the reward loop's ``rm_scores``."""
    for key in ("token_level_scores", "rm_scores"):
        if key in data.batch.keys():
            return data.batch[key].sum(-1)
    raise KeyError(f"the batch has neither 'token_level_scores' nor 'rm_scores'; keys: {list(data.batch.keys())}")


def _non_tensor(data: DataProto, key: str, what: str) -> np.ndarray:
    if key not in data.non_tensor_batch:
        raise KeyError(
            f"{what}: the batch has no '{key}' in non_tensor_batch (reward_extra_info keys and dataset columns land "
            f"there). Available: {sorted(data.non_tensor_batch)}. Return '{key}' from your reward function's dict "
            "or change the config key."
        )
    return data.non_tensor_batch[key]


# ----------------------------------------------------------------------------- COPO
def attach_copo_fields(data: DataProto, options: COPOOptions) -> dict[str, float]:
    """Attach COPO's per-sample ``grouprl_copo_local``, ``grouprl_copo_global``, ``grouprl_copo_weight``.

    Formulas: :mod:`grouprl_core.copo` (Han et al., arXiv 2508.04138). The answers come from
    ``non_tensor_batch[options.answer_key]`` (e.g. math_dapo's or grouprl's ``pred``; compared as
    strings, as the official code). A row without an answer (``""``, blank or None) is keyed by its
    reward value, exactly as the TRL trainer keys a completion its extractor finds nothing in
    (:func:`grouprl_core.copo.answer_keys`); ``answer_key: null`` keys every row by its reward. The
    batch is the whole generation batch, so the standardisation of ``A^glob`` is global.
    """
    rewards = outcome_rewards(data).to(torch.float32)
    group_ids = batch_group_ids(data, "grouprl_copo")
    if options.answer_key is None:
        answers = [None] * len(data)
    else:
        answers = list(_non_tensor(data, options.answer_key, "algorithm.grouprl.copo.answer_key"))
    answers = [normalise_answer(a) for a in answers]
    result = copo_advantages(
        rewards, group_ids, encode_answers(answer_keys(answers, rewards.tolist())),
        gate_k=options.gate_k, gate_b=options.gate_b, eps=options.eps, entropy_reward_coef=options.entropy_reward_coef,
    )
    weight = copo_blend_weight(result.gate, rewards, result.local, options.blend)
    data.batch["grouprl_copo_local"] = result.local.to(torch.float32)
    data.batch["grouprl_copo_global"] = result.global_.to(torch.float32)
    data.batch["grouprl_copo_weight"] = weight.to(torch.float32)
    fallback_frac = sum(a is None for a in answers) / max(len(answers), 1)
    if fallback_frac > 0 and options.answer_key is not None:
        _warn_once(
            "copo_fallback",
            f"COPO: {100 * fallback_frac:.0f}% of the batch's rows have no answer in "
            f"'{options.answer_key}'; their reward values stand in as answers for the consistency entropy "
            f"(see {names.COPO_EXTRACT_FALLBACK_FRAC}; this warning is not repeated).")
    return {
        names.COPO_CONSISTENCY_ENTROPY: _mean_per_group(result.entropy, group_ids),
        names.COPO_GATE_MEAN: _mean_per_group(result.gate, group_ids),
        names.COPO_GLOBAL_ADV_STD: result.global_std,
        names.COPO_LOCAL_WEIGHT_MEAN: float(weight.mean()),
        names.COPO_EXTRACT_FALLBACK_FRAC: fallback_frac,
    }


def _mean_per_group(per_sample: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean over groups of a value every sample of a group carries (each prompt counts once, as TRL logs it)."""
    per_group = per_sample.new_zeros(int(group_ids.max()) + 1).scatter_(0, group_ids, per_sample)
    return float(per_group.mean())


# ----------------------------------------------------------------------------- GCPO-guidance
def guidance_filter(data: DataProto, options: GuidanceOptions) -> tuple[dict[str, float], bool]:
    """DAPO's dynamic filter: groups whose mean accuracy is <= filter_low or >= filter_high leave the update.

    Their ``response_mask`` and ``advantages`` rows are zeroed, which removes them from the loss and
    from the global token count exactly as dropping them would (the batch size stays divisible by
    the DP size). Returns the metrics and whether no group is left (then the update is skipped).
    """
    if not options.dynamic_filter:
        return {}, False  # as the TRL trainer: no filter, no filter metrics
    group_ids = batch_group_ids(data, "grouprl_guidance")
    if options.accuracy_key is None:
        accuracy = outcome_rewards(data).to(torch.float32)
    else:
        raw = _non_tensor(data, options.accuracy_key, "algorithm.grouprl.guidance.accuracy_key")
        accuracy = torch.tensor([0.0 if a is None else float(a) for a in raw], dtype=torch.float32)
        accuracy = torch.nan_to_num(accuracy, nan=0.0)
    outside = (accuracy < 0.0) | (accuracy > 1.0)
    if outside.any():  # as GuidanceGCPOTrainer: the filter needs a correctness score, or it drops every group
        source = ("the reward score (rm_scores)" if options.accuracy_key is None
                  else f"reward extra {options.accuracy_key!r}")
        raise ValueError(
            f"the guidance dynamic filter reads {source} as accuracy and keeps groups whose mean accuracy is strictly "
            f"between {options.filter_low} and {options.filter_high}, but {int(outside.sum())} of {accuracy.numel()} "
            f"values lie outside [0, 1] (e.g. {float(accuracy[outside][0]):g}). Set "
            "algorithm.grouprl.guidance.accuracy_key to a reward extra holding 1 for a correct and 0 for a wrong "
            "response (e.g. acc), or algorithm.grouprl.guidance.dynamic_filter=false."
        )
    keep = dynamic_filter_keep(accuracy, group_ids, options.filter_low, options.filter_high)
    drop = (~keep).unsqueeze(-1)
    data.batch["response_mask"] = data.batch["response_mask"].masked_fill(drop, 0)
    if "advantages" in data.batch.keys():
        data.batch["advantages"] = data.batch["advantages"].masked_fill(drop, 0.0)
    kept = float(keep.float().mean())
    return {names.GUIDANCE_KEPT_FRAC: kept, names.GUIDANCE_SKIPPED_STEP: float(not keep.any())}, not bool(keep.any())


def negative_context_batch(data: DataProto, negative_prompt_ids: list[list[int]], pad_token_id: int) -> DataProto:
    """The batch's responses behind the negative prompts: left-padded ``[c- | response]`` rows.

    Mirrors the row layout that verl's old log-prob pass (``RayPPOTrainer``, verl 0.9.1) sends to
    ``actor_rollout_wg.compute_log_prob``; the returned ``log_probs`` then align with ``responses``.
    """
    responses = data.batch["responses"]
    response_attn = data.batch["attention_mask"][:, -responses.size(1):]
    if len(negative_prompt_ids) != responses.size(0):
        raise ValueError(f"{len(negative_prompt_ids)} negative prompts for {responses.size(0)} rows")
    width = max(len(p) for p in negative_prompt_ids)
    prompts = torch.full((responses.size(0), width), pad_token_id, dtype=responses.dtype)
    prompt_attn = torch.zeros((responses.size(0), width), dtype=response_attn.dtype)
    for i, ids in enumerate(negative_prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"negative prompt of row {i} is empty")
        prompts[i, width - len(ids):] = torch.as_tensor(ids, dtype=responses.dtype)
        prompt_attn[i, width - len(ids):] = 1
    attention_mask = torch.cat([prompt_attn, response_attn], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": data.batch["response_mask"],
    }
    # its own token counts (the worker's MFU estimate reads global_token_num); nothing of the positive batch's
    # routing (routed_experts): the worker routes these other sequences itself
    meta_info = dict(data.meta_info)
    meta_info["global_token_num"] = attention_mask.sum(-1).tolist()
    return DataProto.from_dict(tensors=tensors, meta_info=meta_info)


def apply_guidance_weights(data: DataProto, neg_log_probs: torch.Tensor, options: GuidanceOptions) -> dict[str, float]:
    """``advantages <- A_i * w_it`` with the k3 rank weights of :mod:`grouprl_core.guidance`.

    ``l+`` are the batch's ``old_log_probs`` (the policy that the update starts from), ``l-`` the
    same tokens under the negative context. With one PPO epoch and one mini-batch (the paper's
    on-policy setting) this is the official code's current-policy weight; otherwise it is the
    ``weights_from="old_policy"`` variant of the TRL trainer (a documented deviation).
    """
    mask = data.batch["response_mask"]
    weights, divergence = guidance_token_weights(
        data.batch["old_log_probs"].float(), neg_log_probs.float(), mask, options.rank_x, options.rank_y
    )
    data.batch["advantages"] = data.batch["advantages"] * weights.to(data.batch["advantages"].dtype)
    m = mask.float()
    return {
        names.GUIDANCE_WEIGHT_MAX: float((weights * m).max()) if m.any() else 0.0,
        names.GUIDANCE_DIVERGENCE_MEAN: float((divergence * m).sum() / m.sum().clamp(min=1.0)),
    }


# ----------------------------------------------------------------------------- GCPO-gold
def write_response(data: DataProto, row: int, response_ids: list[int], pad_token_id: int) -> bool:
    """Replace row ``row``'s response by ``response_ids`` (truncated to the response width) in place.

    Rewrites ``responses``, ``response_mask``, the response part of ``input_ids``,
    ``attention_mask`` and ``position_ids``, and zeroes the row's ``rm_scores`` and
    ``rollout_log_probs`` (a replaced row has no rollout log-probs). Returns True if truncated.
    """
    batch = data.batch
    width = batch["responses"].size(1)
    if batch["position_ids"].dim() != 2:
        raise NotImplementedError("gold injection supports 1-D position_ids (no multimodal mrope)")
    ids = list(response_ids)[:width]
    truncated = len(response_ids) > width
    new = torch.full((width,), pad_token_id, dtype=batch["responses"].dtype)
    new[: len(ids)] = torch.as_tensor(ids, dtype=new.dtype)
    valid = torch.zeros(width, dtype=batch["response_mask"].dtype)
    valid[: len(ids)] = 1
    batch["responses"][row] = new
    batch["response_mask"][row] = valid
    batch["input_ids"][row, -width:] = new
    batch["attention_mask"][row, -width:] = valid.to(batch["attention_mask"].dtype)
    prompt_positions = batch["position_ids"][row, :-width][batch["attention_mask"][row, :-width].bool()]
    start = int(prompt_positions[-1]) + 1 if prompt_positions.numel() else 0
    batch["position_ids"][row, -width:] = torch.arange(start, start + width, dtype=batch["position_ids"].dtype)
    for key in ("rm_scores", "rollout_log_probs", "token_level_scores", "token_level_rewards"):
        if key in batch.keys():
            batch[key][row] = 0
    return truncated


# keys of a row that describe the prompt (dataset columns the reward managers read), as the agent loop sends
# them to the reward loop; everything else in the batch belongs to the replaced rollout
GOLD_SCORING_KEYS = ("data_source", "reward_model", "extra_info", "uid", "raw_prompt", "index", "tools_kwargs",
                     "interaction_kwargs", "agent_name", "multi_modal_data")
GOLD_NUM_TURNS = 2  # one user turn and one assistant turn, as verl's single-turn agent loop reports


def gold_scoring_batch(data: DataProto, rows: list[int]) -> DataProto:
    """The rewritten gold rows as verl's reward loop receives a finished rollout: the sequence tensors, the
    prompt's dataset fields and ``__num_turns__`` (nothing of the replaced rollout's tool calls or scores)."""
    tensors = {k: data.batch[k][rows].clone() for k in ("prompts", "responses", "response_mask", "input_ids",
                                                         "attention_mask", "position_ids")}
    non_tensors = {k: data.non_tensor_batch[k][rows] for k in GOLD_SCORING_KEYS if k in data.non_tensor_batch}
    non_tensors["__num_turns__"] = np.full(len(rows), GOLD_NUM_TURNS, dtype=np.int32)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def object_extras(data: DataProto) -> None:
    """Make the reward-extra arrays of ``data`` (``meta_info["reward_extra_keys"]``) object arrays, in place.

    verl's agent loop and reward loop build them with ``np.array(values)``: strings become fixed-width
    arrays (``"4"`` -> ``<U1``), so a longer value written into a row later (a gold row's ``"42"``, a row
    from another GPG round) would be cut silently. Object arrays hold any value.
    """
    for key in data.meta_info.get("reward_extra_keys", []):
        if key in data.non_tensor_batch and data.non_tensor_batch[key].dtype != object:
            data.non_tensor_batch[key] = data.non_tensor_batch[key].astype(object)


def set_rows(array: np.ndarray, rows: list[int], values, what: str) -> None:
    """``array[rows] = values`` in place, refusing to cut or convert a value silently (a fixed-width string or
    a numeric array that cannot hold it)."""
    for row, value in zip(rows, values, strict=True):
        value = value.item() if isinstance(value, np.generic) else value
        array[row] = value
        if array.dtype != object and array[row] != value and value == value:  # value == value: not NaN
            raise ValueError(
                f"{what}: a {array.dtype} array cannot hold {value!r} (it stored {array[row]!r}). grouprl makes reward "
                "extras object arrays when verl balances the batch; keep trainer.balance_batch=true."
            )


def write_scored_rows(data: DataProto, rows: list[int], scored: DataProto) -> None:
    """Copy the reward loop's result for ``rows`` (``rm_scores`` and every reward-extra key) into ``data``, in place
    (``fit`` holds references to ``rm_scores`` and to the extra arrays)."""
    for key in ("rm_scores", "token_level_scores", "token_level_rewards"):
        if key in data.batch.keys():
            data.batch[key][rows] = scored.batch["rm_scores"].to(data.batch[key].dtype)
    for key in data.meta_info.get("reward_extra_keys", []):
        if key not in scored.non_tensor_batch:
            raise ValueError(
                f"the reward returned no {key!r} for a gold row, but did for the rollouts; return the same keys for "
                "every response"
            )
        set_rows(data.non_tensor_batch[key], rows, scored.non_tensor_batch[key], f"reward extra {key!r} of a gold row")


def inject_gold(
    data: DataProto,
    options: GCPOOptions,
    gold_ids: list[list[int] | None],
    score_rows: Callable[[DataProto], DataProto],
    pad_token_id: int,
    eos_token_id: int,
) -> tuple[dict[str, float], list[int]]:
    """GCPO-gold (Wu & Liu, arXiv 2510.07790; our reading in docs/algorithms.md): put the reference
    solution into groups with no correct rollout (``reward >= correct_threshold``), replacing the group's
    last row, in place.

    ``gold_ids[i]`` is the token ids of row i's rendered reference (:func:`grouprl_core.gold.render_gold`,
    no EOS), None when the prompt has no reference. The ids are fitted to the response width as a sampled
    response looks (:func:`grouprl_core.gold.fit_gold_completion`: EOS when it fits, else cut without
    EOS). ``score_rows(batch)`` scores the rewritten rows (:func:`gold_scoring_batch`) the way the run
    scores every rollout (verl's reward loop and configured reward manager) and returns its ``rm_scores``
    and reward extras, which replace the rows' (never assumed correct). Must run after rewards and
    before the old log-prob pass, so the gold rows get their old log-probs from that pass. Returns
    the metrics (the TRL trainer's names and rules) and the replaced rows.
    """
    rewards = outcome_rewards(data).to(torch.float32)
    group_ids = batch_group_ids(data, "grouprl_gcpo")
    if len(gold_ids) != len(data):
        raise ValueError(f"{len(gold_ids)} gold completions for {len(data)} rows")
    has_gold = torch.tensor([g is not None for g in gold_ids])
    plan = plan_gold_injection(rewards >= options.correct_threshold, group_ids, has_gold,
                               trigger=options.trigger, placement=options.placement)
    rows = plan.replace_index.tolist()
    width = data.batch["responses"].size(1)
    truncated = 0
    for row in rows:
        ids, cut = fit_gold_completion(gold_ids[row], eos_token_id, width)
        write_response(data, row, ids, pad_token_id)
        truncated += int(cut)
    num_groups = int(group_ids.max()) + 1
    metrics = {names.GOLD_INJECTED_FRAC: plan.num_injected / num_groups}
    if options.trigger != "never":  # the policy's own reward, comparable with GRPO's
        metrics[names.GOLD_SAMPLED_REWARD_MEAN] = float(rewards.mean())
    if rows:
        scored = score_rows(gold_scoring_batch(data, rows))
        write_scored_rows(data, rows, scored)
        gold_rewards = scored.batch["rm_scores"].sum(-1).float()
        below = gold_rewards < options.correct_threshold
        metrics[names.GOLD_REWARD_MEAN] = float(gold_rewards.mean())
        metrics[names.GOLD_TRUNCATED_FRAC] = truncated / len(rows)
        metrics[names.GOLD_BELOW_THRESHOLD_FRAC] = float(below.float().mean())
        if below.any():
            _warn_gold_below_threshold(int(below.sum()), len(rows), truncated, float(gold_rewards.min()), options,
                                       data.batch["responses"].size(1))
    return metrics, rows


def _warn_gold_below_threshold(num_below: int, num_injected: int, num_truncated: int, lowest: float,
                               options: GCPOOptions, width: int) -> None:
    """Gold that does not count as correct leaves its group without contrast (the TRL trainer warns the same,
    once per run)."""
    if num_truncated:
        cause = (f"{num_truncated} of them were cut at the response length {width} (data.max_response_length): "
                 "raise it, or use a shorter algorithm.grouprl.gcpo.gold_template / reference")
    else:
        cause = "none was cut, so the reward function does not accept the rendered gold"
    _warn_once(
        "gold_below_threshold",
        f"GCPO-gold: {num_below} of {num_injected} injected gold completions scored below "
        f"algorithm.grouprl.gcpo.correct_threshold={options.correct_threshold:g} (lowest {lowest:g}), so their groups "
        f"still have no correct member; {cause}. gold_template={options.gold_template!r}, solution_key="
        f"{options.solution_key!r}. Counted per step in {names.GOLD_BELOW_THRESHOLD_FRAC}; this warning is not repeated.")


# ----------------------------------------------------------------------------- GPG threshold
def group_order(batch: DataProto) -> list[str]:
    """The batch's groups (uids) in the order of their first row."""
    return list(dict.fromkeys(str(u) for u in batch.non_tensor_batch["uid"]))


@dataclass
class GPGGroupAssembler:
    """GPG's valid-fraction threshold beta_th with carry-over, on whole groups (uids) of DataProtos.

    The rule is grouprl_core's, shared with the TRL ``GPGTrainer``: :func:`~grouprl_core.gpg.group_valid_flags`
    judges each round's groups, :func:`~grouprl_core.gpg.gpg_needs_more` asks for another generation round
    while the usable valid fraction (:func:`~grouprl_core.gpg.usable_valid_groups`) is below
    ``valid_threshold`` (at most ``max_resample_rounds``), and :func:`~grouprl_core.gpg.plan_gpg_batch`
    picks the groups: valid ones oldest first (carried groups first), then the last round's zero-variance
    groups; valid groups that do not fit are carried to the next step (at most one batch worth, one
    optimizer step old). This class only moves DataProto rows. Within a round, groups count in generation
    order (``first_order`` for the step's batch, which verl has balanced by then; row order for extra rounds
    and the carry), as TRL counts them in sampling order. The assembled batch has exactly as many rows as
    the first round, so verl's batch-size invariants hold.
    """

    options: GPGOptions
    carry: DataProto | None = None

    @staticmethod
    def _round(batch: DataProto, order: list[str] | None = None) -> tuple[list[str], list[bool]]:
        """The round's groups (uids, in ``order`` or row order) and whether each is valid (non-equal rewards)."""
        uids = [str(u) for u in batch.non_tensor_batch["uid"]]
        order = group_order(batch) if order is None else list(order)
        if sorted(order) != sorted(set(uids)):
            raise ValueError(f"GPG threshold: the group order names {len(order)} uids, the batch holds other groups")
        index = {u: k for k, u in enumerate(order)}
        group_ids = torch.tensor([index[u] for u in uids])
        return order, group_valid_flags(outcome_rewards(batch).float(), group_ids)

    def assemble(self, first: DataProto, generate_more: Callable[[], DataProto],
                 first_order: list[str] | None = None) -> tuple[DataProto, dict[str, float]]:
        """The step's batch from ``first`` (groups in ``first_order``, default row order), the carried groups and
        extra rounds of ``generate_more()``; returns it and the metrics (TRL's names)."""
        opts = self.options
        if opts.valid_threshold <= 0:
            return first, {names.GPG_RESAMPLE_ROUNDS: 0.0}
        rounds: list[DataProto] = []  # oldest first: the carry (if any), the step's batch, extra rounds
        orders: list[list[str]] = []  # each round's groups (uids), in generation order
        round_valid: list[list[bool]] = []  # each round's validity flags, in that order

        def add_round(batch: DataProto, order: list[str], valid: list[bool]) -> None:
            rounds.append(batch)
            orders.append(order)
            round_valid.append(valid)

        carried = self.carry is not None and opts.carry_over
        if carried:
            order, _ = self._round(self.carry)
            add_round(self.carry, order, [True] * len(order))  # carried groups were valid when kept
        self.carry = None
        add_round(first, *self._round(first, first_order))
        n_groups = len(orders[-1])
        extra = 0
        while gpg_needs_more(usable_valid_groups(round_valid, n_groups) / n_groups, threshold=opts.valid_threshold,
                             extra_rounds=extra, max_rounds=opts.max_resample_rounds):
            extra += 1
            batch = generate_more()
            add_round(batch, *self._round(batch))
        plan = plan_gpg_batch(round_valid, n_groups, carry_over=opts.carry_over, carried_round=carried)
        assembled = _select_groups(rounds, orders, plan.chosen)
        if len(assembled) != len(first):
            raise ValueError(
                f"GPG threshold: assembled {len(assembled)} rows from groups of unequal size, expected {len(first)}; "
                "every prompt must have rollout.n responses"
            )
        if plan.carry:
            self.carry = _select_groups(rounds, orders, plan.carry)
        return assembled, {
            names.GPG_RESAMPLE_ROUNDS: float(extra),
            names.GPG_EXTRA_PROMPTS: float(extra * n_groups),
            names.GPG_CARRIED_FRAC: plan.num_carried_used / n_groups,
        }


def _select_groups(rounds: list[DataProto], orders: list[list[str]], pairs: list[tuple[int, int]]) -> DataProto:
    """The rows of the groups ``pairs`` (``(round, group index in orders[round])``), in the order of ``pairs``."""
    pieces = []
    for r, batch in enumerate(rounds):
        wanted = [orders[r][k] for rr, k in pairs if rr == r]
        if not wanted:
            continue
        rows_of: dict[str, list[int]] = {}
        for i, u in enumerate(batch.non_tensor_batch["uid"]):
            rows_of.setdefault(str(u), []).append(i)
        idx = [i for u in wanted for i in rows_of[u]]
        piece = batch.select_idxs(np.asarray(idx, dtype=np.int64))
        # select_idxs shares the round's meta_info (its global_token_num, ...), which DataProto.concat requires
        # to agree across pieces; the rows are copied into the step's batch, which keeps its own meta_info
        piece.meta_info = {}
        pieces.append(piece)
    shapes = {tuple((k, tuple(v.shape[1:])) for k, v in sorted(p.batch.items())) for p in pieces}
    if len(shapes) > 1:
        raise ValueError(
            "GPG threshold: generation rounds have different tensor widths, so their groups cannot be merged. "
            "Keep data.max_prompt_length / max_response_length fixed (the agent loop pads to them)."
        )
    return DataProto.concat(pieces) if len(pieces) > 1 else pieces[0]


def replace_in_place(target: DataProto, source: DataProto) -> None:
    """Copy ``source``'s rows into ``target``'s tensors and arrays in place (same keys, same shapes).

    verl's ``fit`` keeps references to the batch and to arrays taken from it (``extract_reward``),
    so a hook that changes rows must write into the existing storage.
    """
    if set(target.batch.keys()) != set(source.batch.keys()):
        raise ValueError(f"batch keys differ: {sorted(target.batch.keys())} vs {sorted(source.batch.keys())}")
    for key in target.batch.keys():
        target.batch[key].copy_(source.batch[key])
    rows = list(range(len(target)))
    for key, array in target.non_tensor_batch.items():
        set_rows(array, rows, source.non_tensor_batch[key], f"non-tensor {key!r} of a GPG row")
    if "global_token_num" in target.meta_info:
        target.meta_info["global_token_num"] = torch.sum(target.batch["attention_mask"], dim=-1).tolist()
