"""The one module of grouprl_trl that touches TRL's private API.

TRL's ``GRPOTrainer`` has no hook between rewards, advantages and loss, so an algorithm has to
override private methods (``_calculate_rewards``, ``_generate_and_score_completions``,
``_compute_loss`` ...) and read private state (``_metrics``, ``_logs``, ``_step`` ...). Every such
touch lives here and nowhere else in the package:

* :class:`TRLHooks` overrides each private method we need with a one-line forward to a named hook
  (``score_completions``, ``build_generation_batch`` ...) whose default is TRL's own step, so the
  trainers override plain names and call ``super()`` for TRL's behaviour;
* small functions wrap the private state and helpers (:func:`metrics`, :func:`policy_forward`,
  :func:`capture_logged_rows` ...).

Each touch says which TRL versions it was checked on. ``tests/test_trl_contract.py`` pins the
signatures, tuple layouts, batch keys and log keys relied on here, so an upstream change fails
by name. Supported: TRL >= 1.14.2, < 1.17, except 1.15.x (see :data:`EXCLUDED_TRL`).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import NamedTuple

import torch
import trl
from packaging.version import Version
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    RepeatSampler,
    nanstd,
    pad,
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
    use_adapter,
)

MIN_TRL = "1.14.2"
MAX_TRL = "1.17"  # exclusive: newer versions are untested, the contract test says what changed
EXCLUDED_TRL = {
    "1.15": "TRL 1.15.x always scores log-probs with its fused LM-head kernel (trl.kernels, Triton), which the "
    "CPU build of torch lacks, so even a plain GRPOTrainer fails there",
}
CHECKED_ON = ("1.14.2", "1.16.0")
SUPPORTED_TRL = f">={MIN_TRL},<{MAX_TRL}, not 1.15.x"


def check_trl_version(version: str) -> None:
    """Refuse a TRL version known not to work, warn about one newer than the tested range."""
    v = Version(version)
    excluded = EXCLUDED_TRL.get(f"{v.major}.{v.minor}")
    if v < Version(MIN_TRL) or excluded:
        why = f" ({excluded})" if excluded else ""
        raise ImportError(
            f"grouprl_trl supports TRL {SUPPORTED_TRL}; TRL {version} is installed{why}. "
            f"Install a supported version, e.g. pip install 'trl>={MIN_TRL},!=1.15.*,<{MAX_TRL}'."
        )
    if v >= Version(MAX_TRL):
        warnings.warn(
            f"grouprl_trl was tested with TRL {', '.join(CHECKED_ON)} (supported {SUPPORTED_TRL}); TRL {version} is "
            "installed. Run tests/test_trl_contract.py to see whether the private TRL API it relies on changed.",
            stacklevel=2,
        )


check_trl_version(trl.__version__)

# The multimodal inputs GRPOTrainer._compute_loss forwards to the policy (TRL 1.14.2, 1.16.0), in its order.
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class Rollouts(NamedTuple):
    """The 8-tuple ``GRPOTrainer._generate`` returns (TRL 1.14.2, 1.16.0), by name."""

    prompt_ids: list
    completion_ids: list
    tool_mask: list | None
    completions: list
    logprobs: list | None
    extra_fields: dict
    images: list | None
    tool_images: list | None


class PolicyOutput(NamedTuple):
    """The 3-tuple ``GRPOTrainer._get_per_token_logps_and_entropies`` returns (TRL 1.14.2, 1.16.0)."""

    logps: torch.Tensor  # (B, T) log-probs of the completion tokens (temperature-scaled logits)
    entropies: torch.Tensor | None  # (B, T) when compute_entropy
    aux_loss: torch.Tensor | None  # 0-dim MoE load-balancing loss when compute_aux_loss


# ----------------------------------------------------------------------------- hooks
class TRLHooks(GRPOTrainer):
    """``GRPOTrainer`` with its private steps forwarded to named hooks.

    Each override below is one line; the hook's default runs TRL's own method, so a subclass that
    overrides a hook and calls ``super()`` gets TRL's behaviour. Checked on TRL 1.14.2 and 1.16.0.

    A subclass names itself with ``algorithm_name`` (also the default output folder suffix) and
    ``paper`` (``{"title", "id"}``); they become TRL's model-card class attributes ``_name``,
    ``_paper`` and ``_tag_names`` (``["trl", <algorithm name in lower case>, "grouprl"]``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "algorithm_name" in own:
            cls._name = own["algorithm_name"]
            cls._tag_names = ["trl", own["algorithm_name"].lower(), "grouprl"]
        if "paper" in own:
            cls._paper = dict(own["paper"])

    # --- TRL's private methods -> hooks
    def _generate(self, prompts):
        return tuple(self.generate_rollouts(prompts))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        return self.score_completions(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        return self.build_generation_batch(inputs)

    def _prepare_inputs(self, generation_batch):
        return self.next_micro_batch(generation_batch)

    def _compute_loss(self, model, inputs):
        return self.policy_loss(model, inputs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self.save_extra_state(checkpoint_dir(self, trial))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_extra_state(checkpoint)

    # --- hooks (defaults: TRL's behaviour)
    def generate_rollouts(self, prompts: list) -> Rollouts:
        """``GRPOTrainer._generate(prompts)``: sampled completions as Python lists, before TRL builds tensors."""
        return Rollouts(*super()._generate(prompts))

    def score_completions(self, inputs, prompts, completions, completion_ids_list) -> torch.Tensor:
        """``GRPOTrainer._calculate_rewards``: ``(N_global, num_reward_funcs)`` rewards gathered over processes,
        a reward function's None as NaN."""
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def build_generation_batch(self, inputs: list[dict]) -> dict:
        """``GRPOTrainer._generate_and_score_completions``: generate, score and build this process's batch
        (keys: see :data:`BATCH_KEYS`), with GRPO advantages, logged metrics and completions table."""
        return super()._generate_and_score_completions(inputs)

    def next_micro_batch(self, generation_batch) -> dict:
        """``GRPOTrainer._prepare_inputs``: the micro-batch of this step (train: from the buffered
        generation batch, regenerated every ``steps_per_generation * num_iterations`` steps)."""
        return super()._prepare_inputs(generation_batch)

    def policy_loss(self, model, inputs: dict) -> torch.Tensor:
        """``GRPOTrainer._compute_loss``: the scalar loss of one micro-batch, already scaled for gradient
        accumulation (``loss_is_scaled_for_ga``)."""
        return super()._compute_loss(model, inputs)

    def save_extra_state(self, checkpoint_dir: str) -> None:
        """Called after ``GRPOTrainer._save_checkpoint`` wrote ``checkpoint_dir`` (every process)."""

    def load_extra_state(self, checkpoint_dir: str) -> None:
        """Called after ``Trainer._load_optimizer_and_scheduler`` on resume (every process, every backend)."""


# The keys of the batch ``_generate_and_score_completions`` returns that grouprl reads or writes
# (TRL 1.14.2, 1.16.0). Optional ones are present only in some setups.
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch")
OPTIONAL_BATCH_KEYS = (
    "old_per_token_logps",  # when the update is off-policy (or vLLM IS correction)
    "ref_per_token_logps",  # when beta != 0
    "importance_sampling_ratio",  # vLLM IS correction
    "sampling_per_token_logps",  # vLLM
    "tool_mask",  # tools / environments
    *MULTIMODAL_KEYS,
)
# GRPOTrainer._logs (TRL 1.14.2, 1.16.0): the completions table, one entry per global row.
LOG_KEYS = ("images", "prompt", "completion", "rewards", "advantages", "extra")


# ----------------------------------------------------------------------------- private state
def metrics(trainer: GRPOTrainer, mode: str) -> dict[str, list]:
    """``trainer._metrics[mode]``: name -> values, averaged and cleared by ``GRPOTrainer.log`` (TRL 1.14.2, 1.16.0)."""
    return trainer._metrics[mode]


def text_tokenizer(trainer: GRPOTrainer):
    """``trainer._tokenizer``: the text tokenizer (the processor's, for a multimodal processor) (TRL 1.14.2, 1.16.0)."""
    return trainer._tokenizer


def tokenize_prompts(trainer: GRPOTrainer, prompts: list) -> list[list[int]]:
    """Prompt token ids as TRL tokenises prompts for generation (chat template included):
    ``GRPOTrainer._tokenize_prompts(prompts)[0]`` (TRL 1.14.2, 1.16.0)."""
    return trainer._tokenize_prompts(prompts)[0]


def drop_pending_reward_logs(trainer: GRPOTrainer) -> None:
    """Forget what reward functions logged through ``log_extra`` / ``log_metric`` since the last flush
    (``_pending_extra_logs``, ``_pending_metrics``; TRL 1.14.2, 1.16.0). For scoring passes whose rows
    never reach the completions table."""
    trainer._pending_extra_logs.clear()
    trainer._pending_metrics.clear()


def checkpoint_dir(trainer: GRPOTrainer, trial) -> str:
    """The folder ``Trainer._save_checkpoint`` (transformers 5.x) just wrote: ``<output>/checkpoint-<step>``."""
    return os.path.join(trainer._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


# ----------------------------------------------------------------------------- forward passes
def per_token_logps(trainer: GRPOTrainer, model, input_ids, attention_mask, logits_to_keep, **kwargs) -> PolicyOutput:
    """``GRPOTrainer._get_per_token_logps_and_entropies`` (TRL 1.14.2, 1.16.0) as a :class:`PolicyOutput`."""
    return PolicyOutput(*trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                    **kwargs))


def policy_forward(
    trainer: GRPOTrainer,
    model,
    inputs: dict,
    *,
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None,
    compute_entropy: bool = False,
    compute_aux_loss: bool = False,
    batch_size: int | None = None,
) -> PolicyOutput:
    """Log-probs of ``inputs``' completion tokens under ``model``, called exactly as
    ``GRPOTrainer._compute_loss`` calls it (TRL 1.14.2, 1.16.0): prompt + completion, every
    multimodal input of the batch (:data:`MULTIMODAL_KEYS`).

    ``prompt=(ids, mask)`` scores the same completions behind another (left-padded) prompt; the
    batch's multimodal inputs belong to its own prompt, so that is refused for multimodal batches.
    """
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    if prompt is None:
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        multimodal = {key: inputs.get(key) for key in MULTIMODAL_KEYS}
    else:
        prompt_ids, prompt_mask = prompt
        present = [key for key in MULTIMODAL_KEYS if inputs.get(key) is not None]
        if present:
            raise NotImplementedError(f"scoring completions behind another prompt is text-only; the batch has {present}")
        multimodal = {}
    chunking = {} if batch_size is None else {"batch_size": batch_size}
    return per_token_logps(
        trainer,
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([prompt_mask, completion_mask], dim=1),
        completion_ids.size(1),
        **chunking,
        compute_entropy=compute_entropy,
        compute_aux_loss=compute_aux_loss,
        **multimodal,
    )


def scoring_context(trainer: GRPOTrainer):
    """``torch.no_grad()`` without gradient checkpointing, as TRL's own old/reference passes run
    (``_generate_and_score_completions``, TRL 1.14.2, 1.16.0)."""
    if not trainer.args.gradient_checkpointing:  # skip the walk over all modules the toggle costs
        return torch.no_grad()
    return _no_grad_without_checkpointing(trainer)


@contextmanager
def _no_grad_without_checkpointing(trainer):
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        yield


def reference_adapter(trainer: GRPOTrainer):
    """``(model, context)`` giving reference log-probs as TRL's reference pass does (TRL 1.14.2, 1.16.0):
    the separate reference model, or the PEFT policy with its adapter off (or its ``"ref"`` adapter on)."""
    if trainer.ref_model is not None:
        return trainer.ref_model, nullcontext()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return trainer.model, use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)


# ----------------------------------------------------------------------------- completions table
def _empty_logs_like(logs: dict) -> dict:
    fresh = {}
    for key, value in logs.items():
        if isinstance(value, deque):
            fresh[key] = deque(maxlen=value.maxlen)
        elif isinstance(value, defaultdict):
            fresh[key] = defaultdict(value.default_factory)
        else:
            raise TypeError(f"GRPOTrainer._logs[{key!r}] is a {type(value).__name__}; grouprl expects deques")
    return fresh


def _rows_of(logs: dict) -> list[dict]:
    n = len(logs["prompt"])
    images = list(logs["images"]) if len(logs["images"]) == n else None
    rows = []
    for i in range(n):
        row = {
            "prompt": logs["prompt"][i],
            "completion": logs["completion"][i],
            "rewards": {name: values[i] for name, values in logs["rewards"].items() if i < len(values)},
            "extra": {column: values[i] for column, values in logs["extra"].items() if i < len(values)},
        }
        if images is not None:
            row["images"] = images[i]
        rows.append(row)
    return rows


@contextmanager
def capture_logged_rows(trainer: GRPOTrainer):
    """Collect what TRL appends to its completions table (``trainer._logs``, TRL 1.14.2, 1.16.0) inside
    the block, as one dict per global row (prompt, completion, rewards, extra columns[, images]),
    instead of appending it. The yielded list is filled when the block ends; TRL's advantages are
    left out (the caller logs the trained ones with :func:`append_logged_rows`)."""
    saved = trainer._logs
    trainer._logs = _empty_logs_like(saved)
    rows: list[dict] = []
    try:
        yield rows
        rows.extend(_rows_of(trainer._logs))
    finally:
        trainer._logs = saved


def _ensure_capacity(logs: dict, size: int) -> None:
    """Grow TRL's deques (sized to one generation batch) so a batch of ``size`` rows fits whole
    (GCPO-gold "append" trains on more rows than it generated)."""
    for key, value in logs.items():
        if isinstance(value, deque) and value.maxlen is not None and value.maxlen < size:
            logs[key] = deque(value, maxlen=size)
        elif isinstance(value, defaultdict):
            for column, values in value.items():
                if values.maxlen is not None and values.maxlen < size:
                    value[column] = deque(values, maxlen=size)
            if (value.default_factory().maxlen or size) < size:
                value.default_factory = partial(deque, maxlen=size)


def append_logged_rows(trainer: GRPOTrainer, rows: list[dict], advantages: list[float]) -> None:
    """Append rows (from :func:`capture_logged_rows`) with the advantages they were trained on to the
    completions table ``trainer._logs`` (TRL 1.14.2, 1.16.0). Every reward / extra column gets an entry
    per row (None where a row has none), so the table's columns stay the same length."""
    if len(rows) != len(advantages):
        raise ValueError(f"{len(rows)} logged rows for {len(advantages)} advantages")
    _ensure_capacity(trainer._logs, len(rows))
    logs = trainer._logs
    reward_names = set(logs["rewards"]).union(*(row["rewards"] for row in rows))
    columns = set(logs["extra"]).union(*(row["extra"] for row in rows))
    for row, advantage in zip(rows, advantages):
        logs["prompt"].append(row["prompt"])
        logs["completion"].append(row["completion"])
        logs["advantages"].append(advantage)
        for name in reward_names:
            logs["rewards"][name].append(row["rewards"].get(name))
        for column in columns:
            logs["extra"][column].append(row["extra"].get(column))
        if "images" in row:
            logs["images"].append(row["images"])


def completion_lengths_and_truncation(trainer: GRPOTrainer, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Each local row's completion length and whether it was truncated, as ``GRPOTrainer._generate`` logs them
    (TRL 1.14.2, 1.16.0): the model's tokens (``sum(tool_mask)`` with tools), and "the last token is neither an
    eos id (``trainer.eos_token_ids``) nor the pad token"."""
    device = trainer.accelerator.device
    if rollouts.tool_mask is not None:
        lengths = [sum(mask) for mask in rollouts.tool_mask]
    else:
        lengths = [len(ids) for ids in rollouts.completion_ids]
    eos_and_pad = [*trainer.eos_token_ids, trainer._tokenizer.pad_token_id]
    truncated = [ids[-1] not in eos_and_pad for ids in rollouts.completion_ids]
    return torch.tensor(lengths, device=device), torch.tensor(truncated, dtype=torch.bool, device=device)


def logged_advantages(trainer: GRPOTrainer) -> list[float]:
    """The advantage column of the completions table (``trainer._logs["advantages"]``, TRL 1.14.2, 1.16.0)."""
    return list(trainer._logs["advantages"])


# ----------------------------------------------------------------------------- buffering
def split_generation_batch(batch: dict, num_chunks: int) -> list[dict]:
    """TRL's split of a generation batch into micro-batches (``GRPOTrainer._prepare_inputs``, TRL
    1.14.2, 1.16.0): shuffle rows, split into ``num_chunks`` equal parts (multimodal-aware)."""
    batch = split_pixel_values_by_grid(batch)
    batch = shuffle_sequence_dict(batch)
    return [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, num_chunks)]


def shuffle_rows(batch: dict) -> dict:
    """TRL's row shuffle of a generation batch (``trl.trainer.utils.shuffle_sequence_dict``)."""
    return shuffle_sequence_dict(batch)


def wrap_rollouts(trainer: GRPOTrainer, wrap: Callable[[Callable], Callable]) -> None:
    """Send the trainer's rollouts through ``wrap(original)`` (the benchmarks' timers and counters): TRL 1.14-1.16
    makes every rollout, GPG's extra rounds too, in ``GRPOTrainer._generate_single_turn``, whose result starts
    with one entry per generated row."""
    trainer._generate_single_turn = wrap(trainer._generate_single_turn)


def buffered_micro_batch(trainer: GRPOTrainer, generation_batch, split: Callable[[dict], list[dict]]) -> dict:
    """``GRPOTrainer._prepare_inputs`` (TRL 1.14.2, 1.16.0) with the split of the generation batch
    replaced by ``split(batch) -> micro-batches``; buffering and regeneration cadence as TRL's."""
    if not trainer.model.training:
        return trainer._generate_and_score_completions(generation_batch)
    generate_every = trainer.args.steps_per_generation * trainer.num_iterations
    if trainer._step % generate_every == 0 or trainer._buffered_inputs is None:
        trainer._buffered_inputs = split(trainer._generate_and_score_completions(generation_batch))
    return trainer._buffered_inputs[trainer._step % trainer.args.steps_per_generation]


def repeat_sampler(data_source, mini_repeat_count: int, batch_size: int, seed: int) -> RepeatSampler:
    """A shuffled ``trl.trainer.utils.RepeatSampler`` pass (the layout ``GRPOTrainer._get_train_sampler``
    uses, TRL 1.14.2, 1.16.0): each index ``mini_repeat_count`` times in a row."""
    return RepeatSampler(data_source=data_source, mini_repeat_count=mini_repeat_count, batch_size=batch_size,
                         repeat_count=1, shuffle=True, seed=seed)


def pad_rows(rows: list[torch.Tensor], padding_value, padding_side: str, pad_to_multiple_of=None) -> torch.Tensor:
    """``trl.trainer.utils.pad`` (TRL 1.14.2, 1.16.0): stack 1-D tensors, padded on ``padding_side``."""
    return pad(rows, padding_value=padding_value, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of)

