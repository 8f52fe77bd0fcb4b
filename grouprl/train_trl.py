"""Run one resolved TRL recipe: ``python -m grouprl.train_trl --config recipe.yaml [--field value ...]``.

Mirrors ``trl/scripts/grpo.py`` (TRL 1.16): one flat YAML parsed by ``TrlParser`` into
``(RecipeArguments, <trainer config class>, ModelConfig)``; then model, tokenizer, dataset and reward
functions are built and the trainer trains and saves. ``grouprl train`` calls this module (through
``accelerate launch`` for multi-process recipes, ``torchrun`` for several CPU processes); it can also
be launched by hand. ``resume_from_checkpoint`` (a checkpoint folder, or ``last`` for the newest
``checkpoint-N`` in ``output_dir``) continues a run; a few lines saying what runs are printed before
TRL starts.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from grouprl.extras import missing_module_message
from grouprl.recipes import algorithm_name

logger = logging.getLogger("grouprl.train_trl")

TINY_MODEL = "tiny"  # model_name_or_path value for the embedded tiny model (grouprl_trl.tiny)
TOY_DATASET = "toy"  # dataset_path value for the embedded toy task
RESUME_LAST = "last"  # resume_from_checkpoint value: the newest checkpoint-N folder in output_dir


@dataclass
class RecipeArguments:
    """Launcher fields of a TRL recipe (the rest are trainer-config and ``ModelConfig`` fields)."""

    trainer: str = field(metadata={"help": "Dotted path of the trainer class, e.g. grouprl_trl.GPGTrainer."})
    reward_funcs: list[str] = field(metadata={"help": "Dotted paths of reward functions f(completions, solution, **kw)."})
    dataset_path: str = field(
        metadata={"help": "A directory written by datasets' save_to_disk (`grouprl data prepare`), a hub "
                          f"dataset name, or {TOY_DATASET!r} for the embedded toy task."}
    )
    backend: str = field(default="trl", metadata={"help": "Always 'trl' here."})
    recipe_name: str | None = field(default=None, metadata={"help": "Set by the launcher: the recipe's name."})
    description: str = field(default="", metadata={"help": "One line for `grouprl list`."})
    hardware: str = field(default="", metadata={"help": "What the recipe needs to run as written."})
    gpu_memory_gb: float | None = field(
        default=None, metadata={"help": "Memory per GPU (GB) the recipe is sized for; `grouprl train` checks it."}
    )
    accelerate_config: str | None = field(default=None, metadata={"help": "Bundled name (zero2, zero3) or a path."})
    num_processes: int = field(default=1, metadata={"help": "Processes (GPUs) for accelerate launch."})
    dataset_prepare: str | None = field(
        default=None, metadata={"help": "Name for `grouprl data prepare NAME --out dataset_path` (for the error hint)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    toy_rows: int = field(default=64, metadata={"help": "Rows of the toy task (dataset_path: toy)."})
    system_prompt: str | None = field(
        default=None,
        metadata={"help": "If set, becomes the system message of every conversational prompt (replacing one "
                          "already there)."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Drop prompts longer than this many tokens (as the official open-r1 GPG loader does); "
                          "TRL 1.16 has no prompt truncation."},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Rebuild every prompt from the dataset's 'problem' column with this `grouprl data` "
                          "template (e.g. gcpo-guidance: the question, a blank line, GCPO-guidance's format "
                          "instruction), replacing the prepared prompt."},
    )
    raw_prompt: bool = field(
        default=False,
        metadata={"help": "Give the trainer each prompt as plain text (the content of its one user message), so TRL "
                          "applies no chat template, as the official GPG-7B run fed its SimpleRL-Zoo prompts."},
    )


def import_object(dotted: str, what: str):
    """``package.module.name`` -> the object, with an error that names the field."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"{what} {dotted!r} must be a dotted path like package.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"{what} {dotted!r}: cannot import {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise ImportError(f"{what} {dotted!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def config_class_for(trainer_path: str) -> str:
    """``pkg.FooTrainer`` -> ``pkg.FooConfig`` (the convention TRL and grouprl_trl follow)."""
    module_name, _, name = trainer_path.rpartition(".")
    if not name.endswith("Trainer"):
        raise ValueError(f"trainer {trainer_path!r}: the class name must end in 'Trainer' (e.g. grouprl_trl.GPGTrainer)")
    return f"{module_name}.{name[: -len('Trainer')]}Config"


def make_parser(trainer_path: str):
    from trl import ModelConfig, TrlParser

    config_cls = import_object(config_class_for(trainer_path), "trainer config class")
    return TrlParser((RecipeArguments, config_cls, ModelConfig))


def read_trainer_field(argv: list[str]) -> str:
    """The ``trainer`` value, from ``--trainer`` or the ``--config`` YAML (needed to pick the parser)."""
    if "--trainer" in argv:
        return argv[argv.index("--trainer") + 1]
    if "--config" not in argv:
        raise SystemExit("usage: python -m grouprl.train_trl --config RECIPE.yaml [--field value ...]")
    with open(argv[argv.index("--config") + 1]) as handle:
        data = yaml.safe_load(handle) or {}
    if "trainer" not in data:
        raise SystemExit("the recipe has no 'trainer' field (e.g. trainer: grouprl_trl.GPGTrainer)")
    return data["trainer"]


def parse(argv: list[str]):
    """``(RecipeArguments, trainer config, ModelConfig)`` from ``--config`` YAML plus command-line flags."""
    parser = make_parser(read_trainer_field(argv))
    return parser.parse_args_and_config(argv)


# ----------------------------------------------------------------------------- building blocks
def load_model_and_tokenizer(model_args, training_args):
    """The policy (a path or hub name, loaded by the trainer) or the embedded tiny model, plus its tokenizer."""
    from transformers import AutoTokenizer

    if model_args.model_name_or_path == TINY_MODEL:
        from grouprl_trl.tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer()
        return build_tiny_model(tokenizer), tokenizer
    # Same model_init_kwargs as trl/scripts/grpo.py builds from ModelConfig.
    init_kwargs = dict(training_args.model_init_kwargs or {})
    init_kwargs.setdefault("revision", model_args.model_revision)
    if model_args.attn_implementation is not None:
        init_kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.dtype is not None:
        init_kwargs.setdefault("dtype", model_args.dtype)
    training_args.model_init_kwargs = init_kwargs
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    return model_args.model_name_or_path, tokenizer


def load_train_dataset(recipe_args: RecipeArguments):
    """The training split: the toy task, a ``save_to_disk`` directory, or a hub dataset."""
    if recipe_args.dataset_path == TOY_DATASET:
        from grouprl_trl.tiny import build_toy_dataset

        return build_toy_dataset(num_rows=recipe_args.toy_rows, seed=0)
    import datasets

    path = Path(recipe_args.dataset_path)
    if path.exists():
        data = datasets.load_from_disk(str(path))
    elif recipe_args.dataset_path.startswith(("data/", "./", "/")):
        hint = recipe_args.dataset_prepare or "NAME"
        raise FileNotFoundError(
            f"dataset_path {recipe_args.dataset_path!r} does not exist. Prepare it first: "
            f"`grouprl data prepare {hint} --out {recipe_args.dataset_path}`"
        )
    else:
        data = datasets.load_dataset(recipe_args.dataset_path)
    if isinstance(data, datasets.DatasetDict):
        if recipe_args.dataset_split not in data:
            raise KeyError(f"dataset_split {recipe_args.dataset_split!r} not in {list(data)} ({recipe_args.dataset_path})")
        data = data[recipe_args.dataset_split]
    for column in ("prompt", "solution"):
        if column not in data.column_names:
            raise ValueError(
                f"dataset {recipe_args.dataset_path!r} has no {column!r} column (columns: {data.column_names}); "
                "prepare it with `grouprl data prepare`"
            )
    return data


def with_system_prompt(prompt, system_prompt: str):
    """A conversational prompt whose system message is ``system_prompt`` (replaced or inserted)."""
    if not isinstance(prompt, list):
        raise ValueError("system_prompt needs conversational prompts (a list of {role, content} messages)")
    messages = [m for m in prompt if m.get("role") != "system"]
    return [{"role": "system", "content": system_prompt}, *messages]


def raw_prompt_text(prompt) -> str:
    """The plain text of a prompt: a string as is, a conversation of one user message as its content."""
    if isinstance(prompt, str):
        return prompt
    roles = [m.get("role") for m in prompt]
    if roles != ["user"] or not isinstance(prompt[0].get("content"), str):
        raise ValueError(
            f"raw_prompt=true passes each prompt as plain text and needs one user message per prompt; a prompt has "
            f"roles {roles}. Drop the other messages (system_prompt: null) or set raw_prompt: false."
        )
    return prompt[0]["content"]


def prepare_dataset(data, recipe_args: RecipeArguments, tokenizer):
    """Apply ``prompt_template``, ``system_prompt``, ``raw_prompt`` and the ``max_prompt_length`` filter (in that
    order), logging how many rows were dropped."""
    if recipe_args.prompt_template is not None:
        from grouprl.data import TEMPLATES

        make_prompt = TEMPLATES.get(recipe_args.prompt_template)
        if make_prompt is None:
            known = sorted(name for name, make in TEMPLATES.items() if make is not None)
            raise ValueError(f"prompt_template={recipe_args.prompt_template!r} is not one of {known}")
        if "problem" not in data.column_names:
            raise ValueError(f"prompt_template needs a 'problem' column (prepare the data with `grouprl data "
                             f"prepare`); the dataset has {data.column_names}")
        data = data.map(lambda row: {"prompt": make_prompt(row["problem"])})
    if recipe_args.system_prompt is not None:
        if recipe_args.raw_prompt:
            raise ValueError("raw_prompt=true passes the user message as plain text, so a system_prompt would be "
                             "lost; set system_prompt: null (or raw_prompt: false)")
        data = data.map(lambda row: {"prompt": with_system_prompt(row["prompt"], recipe_args.system_prompt)})
    if recipe_args.raw_prompt:
        data = data.map(lambda row: {"prompt": raw_prompt_text(row["prompt"])})
    if recipe_args.max_prompt_length is not None:
        limit = recipe_args.max_prompt_length

        def prompt_tokens(row):
            prompt = row["prompt"]
            if isinstance(prompt, list):
                ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(prompt)["input_ids"]
            return len(ids) <= limit

        before = len(data)
        data = data.filter(prompt_tokens, desc=f"dropping prompts > {limit} tokens")
        logger.warning("max_prompt_length=%d: kept %d of %d prompts", limit, len(data), before)
        if len(data) == 0:
            raise ValueError(f"max_prompt_length={limit} removed every prompt; raise it")
    return data


def build_trainer(recipe_args, training_args, model_args):
    """The trainer the recipe names, ready to train."""
    trainer_cls = import_object(recipe_args.trainer, "trainer")
    reward_funcs = [import_object(path, "reward_funcs entry") for path in recipe_args.reward_funcs]
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    train_dataset = prepare_dataset(load_train_dataset(recipe_args), recipe_args, tokenizer)
    from trl import get_peft_config

    return trainer_cls(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


# ----------------------------------------------------------------------------- resume
def resolve_resume(value, output_dir: str) -> str | None:
    """The checkpoint folder that ``resume_from_checkpoint`` names (None: start from scratch).

    ``last`` is the newest ``checkpoint-N`` folder in ``output_dir`` (transformers'
    ``get_last_checkpoint``); anything else must be a checkpoint folder. A name that finds nothing is
    an error, never a silent fresh start.
    """
    if value in (None, ""):
        return None
    if value == RESUME_LAST:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=last: output_dir {output_dir} holds no checkpoint-N folder "
                "(checkpoints are written when save_strategy is 'steps' or 'epoch')"
            )
        return last
    path = Path(str(value))
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={value}: no such folder")
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={value}: not a checkpoint folder (no trainer_state.json); give a "
            f"checkpoint-N folder of an output_dir, or resume_from_checkpoint={RESUME_LAST}"
        )
    return str(path)


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint folder was written at (its ``trainer_state.json``)."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


@contextlib.contextmanager
def cpu_resume_compat(device):
    """Resume a multi-process CPU run despite a transformers / torch mismatch.

    transformers 5.10 ``Trainer._load_optimizer_and_scheduler`` loads the optimizer state with
    ``map_location=self.args.device`` when ``world_size > 1``; in CPU processes (accelerate's
    MULTI_CPU) that device is ``cpu:0``, which torch 2.13's ``torch.load`` refuses ("don't know how to
    restore data location ... (tagged with cpu:0)"). While such a run resumes, a CPU ``map_location``
    reaches ``torch.load`` as plain ``"cpu"`` (the same memory); any other call is unchanged.
    """
    import torch

    if device.type != "cpu" or device.index is None:
        yield
        return
    original = torch.load

    def load(*args, **kwargs):
        location = kwargs.get("map_location")
        if isinstance(location, (str, torch.device)) and torch.device(location).type == "cpu":
            kwargs["map_location"] = "cpu"
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# ----------------------------------------------------------------------------- summary
def describe(recipe_args: RecipeArguments, training_args, model_args, resume: str | None = None) -> str:
    """A few lines saying what this run is, printed before TRL and transformers start logging."""
    from trl import GRPOConfig

    config_name = type(training_args).__name__
    grpo_fields = {f.name for f in fields(GRPOConfig)}
    own = [f.name for f in fields(training_args) if f.name not in grpo_fields and not f.name.startswith("_")]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lines = [
        f"grouprl: {algorithm_name({'backend': 'trl', 'trainer': recipe_args.trainer})} with "
        f"{recipe_args.trainer} / {config_name}, recipe {recipe_args.recipe_name or '(none)'}",
        f"  model {model_args.model_name_or_path} | data {recipe_args.dataset_path} | output {training_args.output_dir}",
        f"  {training_args.per_device_train_batch_size} completions per process x {world} processes x "
        f"{training_args.gradient_accumulation_steps} accumulation steps, {training_args.num_generations} per prompt; "
        f"lr {training_args.learning_rate}; max_steps {training_args.max_steps}; use_vllm {training_args.use_vllm}",
        f"  loss_type {training_args.loss_type}, beta {training_args.beta}, epsilon {training_args.epsilon}"
        f"/{training_args.epsilon_high}",
    ]
    if own:
        lines.append(f"  {config_name}: " + ", ".join(f"{name}={getattr(training_args, name)!r}" for name in own))
    if resume:
        lines.append(f"  resuming from {resume} (step {checkpoint_step(resume)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ModuleNotFoundError as err:
        message = missing_module_message(err, "grouprl.train_trl")
        if message is None:
            raise
        raise SystemExit(message) from err


def _main(argv: list[str]) -> int:
    recipe_args, training_args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(recipe_args, training_args, model_args, resume), flush=True)
    trainer = build_trainer(recipe_args, training_args, model_args)
    with cpu_resume_compat(training_args.device) if resume else contextlib.nullcontext():
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
