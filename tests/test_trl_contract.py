"""The upstream contract of grouprl_trl: what grouprl_trl/_compat.py relies on in TRL's private API.

Every check is named after the TRL symbol it pins, so an upgrade that changes one of them fails
here, by name, before a trainer misbehaves. Also: no module of the project (grouprl*, bench) but the two
_compat.py modules names a private TRL symbol (overrides, attribute reads, imports from TRL submodules).
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections import defaultdict, deque
from pathlib import Path

import pytest
import torch
import trl
from conftest import tiny_trainer_kwargs
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import utils as trl_utils

from grouprl_trl import _compat
from grouprl_trl.tiny import build_tiny_model, build_tokenizer, build_toy_dataset

PACKAGE = Path(_compat.__file__).parent


def params(func) -> list[str]:
    return [p for p in inspect.signature(func).parameters if p != "self"]


# ----------------------------------------------------------------------------- versions
def test_installed_trl_is_in_the_supported_range():
    _compat.check_trl_version(trl.__version__)  # raises outside the range


@pytest.mark.parametrize("version", ["1.14.1", "1.15.0", "1.15.2", "0.29.0"])
def test_unsupported_trl_versions_are_refused_naming_both_versions(version):
    with pytest.raises(ImportError, match=rf"supports TRL >=1\.14\.2,<1\.17, not 1\.15\.x; TRL {version}"):
        _compat.check_trl_version(version)


def test_a_newer_trl_warns_and_points_at_this_test():
    with pytest.warns(UserWarning, match="test_trl_contract"):
        _compat.check_trl_version("1.17.0")


@pytest.mark.parametrize("version", ["1.14.2", "1.16.0", "1.16.3"])
def test_supported_versions_pass_silently(version, recwarn):
    _compat.check_trl_version(version)
    assert not [w for w in recwarn if "grouprl_trl" in str(w.message)]


# ----------------------------------------------------------------------------- signatures
OVERRIDDEN = {  # TRL method -> its parameters; TRLHooks overrides each with a one-line forward
    "_generate": ["prompts"],
    "_calculate_rewards": ["inputs", "prompts", "completions", "completion_ids_list"],
    "_generate_and_score_completions": ["inputs"],
    "_prepare_inputs": ["generation_batch"],
    "_compute_loss": ["model", "inputs"],
    "_save_checkpoint": ["model", "trial"],
    "_load_optimizer_and_scheduler": ["checkpoint"],
}
CALLED = {  # TRL method -> the parameters we pass (a prefix of its parameters)
    "_tokenize_prompts": ["prompts"],
    "_get_output_dir": ["trial"],
    "_generate_single_turn": ["prompt_ids"],  # wrap_rollouts (the benchmarks)
}


@pytest.mark.parametrize("name", list(OVERRIDDEN))
def test_overridden_method_keeps_its_signature(name):
    assert params(getattr(GRPOTrainer, name)) == OVERRIDDEN[name]
    assert name in vars(_compat.TRLHooks)  # and the adapter overrides exactly this name


@pytest.mark.parametrize("name", list(CALLED))
def test_called_method_keeps_its_signature(name):
    assert params(getattr(GRPOTrainer, name))[: len(CALLED[name])] == CALLED[name]


def test_get_per_token_logps_and_entropies_accepts_what_we_pass():
    """``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size=,
    compute_entropy=, compute_aux_loss=, <multimodal>=)``; TRL 1.14.2 forwards ``*args, **kwargs`` to
    ``_full_logits_logps``, TRL 1.16 takes them directly."""
    func = GRPOTrainer._get_per_token_logps_and_entropies
    names = params(func)
    if "args" in names:  # TRL 1.14.x: a dispatcher in front of the full-logits scorer
        names = params(GRPOTrainer._full_logits_logps)
    expected = ["model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                "compute_aux_loss", *_compat.MULTIMODAL_KEYS]
    assert names == expected


@pytest.mark.parametrize(
    "func,expected",
    [
        (trl_utils.RepeatSampler.__init__,
         ["data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"]),
        (trl_utils.pad, ["tensors", "padding_value", "padding_side", "pad_to_multiple_of"]),
        (trl_utils.nanstd, ["tensor", "dim", "keepdim"]),
        (trl_utils.use_adapter, ["model", "adapter_name"]),
        (trl_utils.split_tensor_dict, ["tensor_dict", "num_chunks"]),
        (trl_utils.shuffle_sequence_dict, ["seq_dict"]),
        (trl_utils.split_pixel_values_by_grid, ["batch"]),
        (trl_utils.unsplit_pixel_values_by_grid, ["batch"]),
    ],
    ids=lambda x: getattr(x, "__qualname__", "") if callable(x) else "",
)
def test_trl_utils_helper_keeps_its_signature(func, expected):
    assert params(func) == expected


def test_disable_gradient_checkpointing_keeps_its_signature():
    from trl.models.utils import disable_gradient_checkpointing

    assert params(disable_gradient_checkpointing) == ["model", "gradient_checkpointing_kwargs"]


def test_model_card_attributes_exist_and_are_written_by_subclasses():
    assert {"_name", "_tag_names", "_paper"} <= set(vars(GRPOTrainer))
    from grouprl_trl import GPGTrainer

    assert (GPGTrainer._name, GPGTrainer._tag_names) == ("GPG", ["trl", "gpg", "grouprl"])


# ----------------------------------------------------------------------------- behaviour on a tiny trainer
@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    """TRL's own GRPOTrainer (no grouprl code in the loop) on the tiny model."""
    tok = build_tokenizer()
    args = GRPOConfig(**tiny_trainer_kwargs(tmp_path_factory.mktemp("grpo"), num_iterations=2))
    trainer = GRPOTrainer(model=build_tiny_model(tok), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=build_toy_dataset(num_rows=8), processing_class=tok)
    trainer.model.train()
    return trainer


def test_private_state_exists(grpo):
    for name in ("_step", "_buffered_inputs", "_tokenizer", "_pending_extra_logs", "_pending_metrics"):
        assert hasattr(grpo, name), name
    assert set(grpo._metrics) == {"train", "eval"} and isinstance(grpo._metrics["train"], defaultdict)
    for name in ("aux_loss_enabled", "router_aux_loss_coef", "use_vllm", "vllm_importance_sampling_correction", "beta",
                 "epsilon_low", "epsilon_high", "importance_sampling_level", "scale_rewards", "num_generations",
                 "num_generations_eval", "max_completion_length", "mask_truncated_completions", "pad_to_multiple_of",
                 "reward_weights", "reward_funcs", "reward_func_names", "ref_model", "tools", "environment_factories",
                 "eos_token_ids"):
        assert hasattr(grpo, name), name


def test_logs_keys_and_containers(grpo):
    logs = grpo._logs
    assert set(logs) == set(_compat.LOG_KEYS)
    for key in ("images", "prompt", "completion", "advantages"):
        assert isinstance(logs[key], deque) and logs[key].maxlen == grpo.args.generation_batch_size, key
    for key in ("rewards", "extra"):
        assert isinstance(logs[key], defaultdict) and isinstance(logs[key]["x"], deque), key
        del logs[key]["x"]


def test_generate_returns_the_rollouts_tuple(grpo):
    rows = [grpo.train_dataset[i] for i in range(2) for _ in range(4)]
    result = GRPOTrainer._generate(grpo, [r["prompt"] for r in rows])
    assert len(result) == len(_compat.Rollouts._fields)
    rollouts = _compat.Rollouts(*result)
    assert len(rollouts.prompt_ids) == len(rollouts.completion_ids) == len(rollouts.completions) == 8
    assert all(isinstance(t, int) for t in rollouts.completion_ids[0])
    assert isinstance(rollouts.completions[0], str) and isinstance(rollouts.extra_fields, dict)


def test_generation_batch_keys_and_logged_rows(grpo):
    rows = [grpo.train_dataset[i] for i in range(2) for _ in range(4)]
    with _compat.capture_logged_rows(grpo) as logged:
        batch = GRPOTrainer._generate_and_score_completions(grpo, rows)
    assert set(_compat.BATCH_KEYS) <= set(batch)
    unknown = set(batch) - set(_compat.BATCH_KEYS) - set(_compat.OPTIONAL_BATCH_KEYS)
    assert not unknown, f"TRL added batch keys grouprl does not know: {sorted(unknown)}"
    assert "old_per_token_logps" in batch  # num_iterations=2: TRL computes old log-probs
    assert batch["num_items_in_batch"].ndim == 0
    assert batch["advantages"].shape == (8,) and batch["completion_ids"].shape[0] == 8
    assert len(logged) == 8 and {"prompt", "completion", "rewards", "extra"} <= set(logged[0])
    assert logged[0]["prompt"] == rows[0]["prompt"]


def test_per_token_logps_tuple_layout(grpo):
    ids = torch.tensor([[5, 6, 7, 8]] * 2)
    out = _compat.per_token_logps(grpo, grpo.model, ids, torch.ones_like(ids), 2, compute_entropy=True)
    assert out.logps.shape == (2, 2) and out.entropies.shape == (2, 2) and out.aux_loss is None
    assert (out.logps <= 0).all()


def test_prepare_inputs_buffers_a_generation_batch(grpo):
    """``_prepare_inputs`` regenerates when ``_step % (steps_per_generation * num_iterations) == 0`` and
    hands out ``_buffered_inputs[_step % steps_per_generation]`` (what buffered_micro_batch mirrors)."""
    source = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "self._step % generate_every == 0 or self._buffered_inputs is None" in source
    assert "self._buffered_inputs[self._step % self.args.steps_per_generation]" in source


# ----------------------------------------------------------------------------- private names outside _compat
@functools.cache
def trl_private_names() -> frozenset[str]:
    """Private names of TRL's GRPOTrainer (methods, class and instance attributes, inherited ones
    included) and of trl.trainer.utils."""
    names = {n for n in dir(GRPOTrainer) if n.startswith("_") and not n.startswith("__")}
    for module in (inspect.getmodule(GRPOTrainer), inspect.getmodule(GRPOTrainer.__mro__[1])):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    names.add(node.attr)
    names |= {n for n in vars(trl_utils) if n.startswith("_") and not n.startswith("__")}
    return frozenset(names)


def private_trl_uses(path: Path, private: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in private:
                    found.append(f"{path.name}:{item.lineno}: def {item.name}")
                targets = item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id in private:
                        found.append(f"{path.name}:{item.lineno}: {target.id} =")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl."):
            found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "trl":
            found += [f"{path.name}:{node.lineno}: from trl import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("trl.")]
    return found


def test_the_private_name_scan_catches_a_private_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from trl.trainer.utils import pad\n"
        "class T:\n"
        "    _name = 'x'\n"
        "    def _compute_loss(self, model, inputs):\n"
        "        return self._metrics\n"
    )
    found = private_trl_uses(sample, trl_private_names())
    assert len(found) == 4, found


REPO = PACKAGE.parent
SCANNED = sorted(p.relative_to(REPO).as_posix() for folder in ("grouprl", "grouprl_core", "grouprl_trl", "grouprl_verl",
                                                             "bench")
                 for p in (REPO / folder).glob("*.py") if p.name != "_compat.py")


@pytest.mark.parametrize("path", SCANNED)
def test_no_module_but_compat_names_a_private_trl_symbol(path):
    assert private_trl_uses(REPO / path, trl_private_names()) == []
