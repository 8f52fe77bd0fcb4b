"""The preflight of ``grouprl train``: what can be checked before a process starts or a weight downloads.

``grouprl train NAME --dry-run`` prints the report; every real launch runs it first and stops
(non-zero exit, nothing spawned) on any failure. Checked, in order:

* **extras**: the Python packages the recipe needs (TRL; verl with Hydra and Ray; DeepSpeed for a
  ZeRO accelerate config; vLLM where the recipe generates with it; flash-attn for
  ``flash_attention_2``), each missing one with the ``pip install "grouprl[EXTRA]"`` that brings it;
* **config**: TRL: every key is a field of ``RecipeArguments``, the trainer's config class or
  ``ModelConfig`` (else "did you mean"), every value has the field's type, and the three objects
  are then built exactly as the launch builds them (``TrlParser``); verl: every Hydra key exists in
  verl's config and keeps its type, Hydra composes the config, ``algorithm.grouprl.<algo>`` and the
  grouprl policy-loss block hold only known keys and valid values (``grouprl_verl.config``), and
  verl's own ``validate_config`` passes;
* **data**: the dataset folders / parquet files exist, else the ``grouprl data prepare`` command
  that writes them;
* **model**: a local model folder exists, or the name is a well-formed hub id (nothing is
  downloaded; the local Hugging Face cache is looked at);
* **resume**: ``resume_from_checkpoint`` names a checkpoint that exists (TRL);
* **hardware**: the GPUs the recipe needs (TRL: ``num_processes`` unless ``use_cpu``; verl:
  ``trainer.n_gpus_per_node``) and the memory per GPU it is sized for (``gpu_memory_gb``) against
  this machine. ``--force`` skips only this comparison.
"""

from __future__ import annotations

import contextlib
import enum
import io
import json
import os
import subprocess
import sys
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from grouprl import recipes
from grouprl.extras import install_command, is_installed

OK, FAIL, SKIP = "ok", "FAIL", "skip"

TRL_MODULES = ("trl", "transformers", "accelerate", "datasets")
VERL_MODULES = ("verl", "hydra", "omegaconf", "ray")


@dataclass
class Check:
    topic: str
    status: str  # OK, FAIL or SKIP
    message: str


@dataclass
class Report:
    """The preflight's findings for one resolved recipe, and a few lines saying what would run."""

    recipe: str
    backend: str
    algorithm: str
    checks: list[Check] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def add(self, topic: str, status: str, message: str) -> None:
        self.checks.append(Check(topic, status, message))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def render(self) -> str:
        lines = [f"preflight: {self.recipe} ({self.algorithm}, {self.backend})"]
        lines += [f"  {c.status:<4}  {c.topic:<8}  {c.message}" for c in self.checks]
        count = len(self.failures)
        lines.append("preflight: all checks passed" if count == 0 else
                     f"preflight: {count} problem{'s' if count > 1 else ''} (FAIL above); nothing was started")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- machine
@dataclass(frozen=True)
class Machine:
    gpu_memory_gb: tuple[float, ...]  # one entry per visible GPU (GB = 1e9 bytes)

    def describe(self) -> str:
        if not self.gpu_memory_gb:
            return "no GPU (CPU only)"
        return f"{len(self.gpu_memory_gb)} GPU(s) with {', '.join(f'{m:.0f}' for m in self.gpu_memory_gb)} GB"


def detect_machine() -> Machine:
    """The GPUs torch sees, asked in a child process: the launcher stays alive for the whole run, and a
    CUDA context opened here would hold memory on GPU 0 until it ends."""
    code = ("import json, torch\n"
            "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
            "print(json.dumps([torch.cuda.get_device_properties(i).total_memory for i in range(n)]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError("torch took over 5 minutes to list the GPUs") from err
    if out.returncode != 0:
        raise RuntimeError(f"could not ask torch for the GPUs: {out.stderr.strip()[-500:]}")
    return Machine(tuple(b / 1e9 for b in json.loads(out.stdout.strip().splitlines()[-1])))


# ----------------------------------------------------------------------------- shared checks
def _check_extras(report: Report, needs: list[tuple[str, str]]) -> set[str]:
    """Report missing modules (each with its install command); returns the missing ones."""
    missing = {}
    for module, why in needs:
        if not is_installed(module):
            missing.setdefault(module, why)
    for module, why in missing.items():
        command = install_command(module) or f"pip install {module}"
        report.add("extras", FAIL, f"{module} (needed by {why}) is not installed: {command}")
    if not missing:
        report.add("extras", OK, ", ".join(dict.fromkeys(m for m, _ in needs)) + " installed")
    return set(missing)


def looks_like_local_path(value: str) -> bool:
    """A dataset or model name that can only be a local path (``data/x``, ``./x``, ``/x``, ``~/x``)."""
    return value.startswith(("data/", "./", "../", "/", "~")) or value.count("/") > 1


def _hub_id_problem(name: str) -> str | None:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # huggingface_hub comes with transformers; without it only the shape is checked
        return None if name.count("/") <= 1 and name.strip() == name and name else "not of the form org/name"
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err).splitlines()[0]
    return None


def check_model(report: Report, name: str, field_name: str, embedded_tiny: bool = False) -> None:
    """A local model folder, or a well-formed hub id (looked up in the local cache only);
    ``embedded_tiny``: the name ``tiny`` is grouprl_trl's in-memory model (TRL recipes)."""
    from grouprl.train_trl import TINY_MODEL

    if embedded_tiny and name == TINY_MODEL:
        report.add("model", OK, f"{field_name}: {name} (embedded tiny model, built in memory)")
        return
    path = Path(name).expanduser()
    if path.exists():
        if (path / "config.json").is_file():
            report.add("model", OK, f"{field_name}: local model folder {name}")
        else:
            report.add("model", FAIL, f"{field_name}: {name} exists but holds no config.json (not a model folder)")
        return
    if looks_like_local_path(name):
        report.add("model", FAIL, f"{field_name}: {name} does not exist (a local path; for the tiny model in a "
                                  "folder: python -m grouprl_trl.tiny --save DIR)")
        return
    problem = _hub_id_problem(name)
    if problem:
        report.add("model", FAIL, f"{field_name}: {name!r} is neither a local folder nor a valid hub id ({problem})")
        return
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        report.add("model", OK, f"{field_name}: {name} (hub id; downloaded at launch)")
        return
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        report.add("model", OK, f"{field_name}: {name} (hub id, in the local Hugging Face cache)")
    elif constants.HF_HUB_OFFLINE:
        report.add("model", FAIL, f"{field_name}: {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                                  "is set: download it first (huggingface-cli download) or unset HF_HUB_OFFLINE")
    else:
        report.add("model", OK, f"{field_name}: {name} (hub id, not in the local cache: downloaded at launch)")


def _check_hardware(report: Report, machine_fn, gpus: int, memory_gb, force: bool, fewer_hint: str,
                    nodes: int = 1) -> None:
    per_gpu = f" with >= {memory_gb:g} GB{' each' if gpus > 1 else ''}" if memory_gb else ""
    need = "CPU only" if gpus == 0 else f"{gpus} GPU{'s' if gpus > 1 else ''}{per_gpu}"
    if nodes > 1:
        need += f" on each of {nodes} nodes"
    if force:
        report.add("hardware", SKIP, f"needs {need}; not compared with this machine (--force)")
        return
    if gpus == 0:
        report.add("hardware", OK, "CPU only")
        return
    try:
        machine = machine_fn()
    except RuntimeError as err:
        report.add("hardware", FAIL, f"needs {need}; could not read this machine's GPUs ({err}); --force skips "
                                     "this check")
        return
    have = machine.gpu_memory_gb
    if len(have) < gpus:
        report.add("hardware", FAIL, f"needs {need}; this machine has {machine.describe()}. {fewer_hint}; "
                                     "--force skips this check")
    elif memory_gb and min(have[:gpus]) < 0.95 * memory_gb:  # cards report a little less than their label
        report.add("hardware", FAIL, f"needs {need}; this machine has {machine.describe()}. Lower the batch per "
                                     "GPU or the lengths until it fits, then --force skips this check")
    else:
        report.add("hardware", OK, f"needs {need}; this machine has {machine.describe()}")


@contextlib.contextmanager
def _quiet():
    """verl and transformers print warnings at import (optional engines, no accelerator): keep the
    report short. What they printed is returned for error messages."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        warnings.simplefilter("ignore")
        yield buffer


# ----------------------------------------------------------------------------- TRL
def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


_BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}  # transformers' string_to_bool


def conforms(value, tp) -> bool:
    """Whether ``value`` (from YAML or a ``key=value`` override) fits the dataclass field type ``tp``.

    Strings for numbers and booleans are accepted when the launch's argparse would convert them
    (``TrlParser`` passes config values as argparse defaults, which argparse converts only when
    they are strings). Types this does not know are accepted; the real build judges them.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BOOL_WORDS)
    if tp in (int, float):
        if isinstance(value, bool):
            return False
        if isinstance(value, str):
            try:
                tp(value)
            except ValueError:
                return False
            return True
        return isinstance(value, int) if tp is int else isinstance(value, (int, float))
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        return not args or all(conforms(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def _trl_needs(recipe: dict) -> list[tuple[str, str]]:
    needs = [(m, "TRL recipes") for m in TRL_MODULES]
    if any(str(f).startswith("grouprl.rewards.") for f in recipe.get("reward_funcs") or []):
        needs.append(("math_verify", "the grouprl.rewards reward functions"))
    if recipe.get("accelerate_config"):
        path = recipes.accelerate_config_path(recipe["accelerate_config"])
        accelerate = yaml.safe_load(path.read_text()) or {}
        if accelerate.get("distributed_type") == "DEEPSPEED":
            needs.append(("deepspeed", f"accelerate_config {recipe['accelerate_config']}"))
    if recipe.get("use_vllm") is True:
        needs.append(("vllm", "use_vllm: true"))
    if recipe.get("attn_implementation") == "flash_attention_2":
        needs.append(("flash_attn", "attn_implementation: flash_attention_2"))
    if recipe.get("use_peft") is True:
        needs.append(("peft", "use_peft: true"))
    return needs


def _check_trl_config(report: Report, recipe: dict):
    """Unknown keys and types first (every problem listed), then the real ``TrlParser`` build."""
    from trl import ModelConfig

    from grouprl.train_trl import RecipeArguments, config_class_for, import_object, parse

    try:
        config_cls = import_object(config_class_for(recipe["trainer"]), "trainer config class")
    except (ImportError, ValueError) as err:
        report.add("config", FAIL, f"trainer: {err}")
        return None
    known: dict[str, object] = {}
    for cls in (RecipeArguments, config_cls, ModelConfig):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.init:
                known.setdefault(f.name, hints.get(f.name, typing.Any))
    where = f"RecipeArguments, {config_cls.__name__} or ModelConfig"
    problems = []
    for key, value in recipe.items():
        if key == "env":  # TrlParser: environment variables to set
            continue
        if key not in known:
            problems.append(f"{key}: not a field of {where}{recipes.did_you_mean(key, known)}")
        elif not conforms(value, known[key]):
            problems.append(f"{key}={value!r}: expected {_type_name(known[key])}")
    for problem in problems:
        report.add("config", FAIL, problem)
    if problems:
        return None

    # Built with use_cpu: TrainingArguments picks its device while it is built, which on a GPU machine
    # would open a CUDA context on GPU 0 in this launcher process, held for the whole run (and without a
    # GPU transformers refuses bf16). The GPUs are the hardware check's business.
    argv = [] if recipe.get("use_cpu") is True else ["--use_cpu", "true"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / recipes.RESOLVED_RECIPE_NAME
        path.write_text(recipes.dump(recipe))
        with _quiet() as printed:
            try:
                built = parse(["--config", str(path), *argv])
            except SystemExit:  # argparse: the message went to stderr
                built = None
                error = printed.getvalue().strip().splitlines()[-1:] or ["argument error"]
            except (ValueError, TypeError, KeyError) as err:
                built, error = None, [str(err).strip().splitlines()[0]]
    if built is None:
        report.add("config", FAIL, f"{config_cls.__name__}: {error[0]}")
        return None
    note = " (built with use_cpu: the launcher leaves the GPUs alone)" if argv else ""
    report.add("config", OK, f"{len(recipe)} fields -> RecipeArguments, {config_cls.__name__}, ModelConfig{note}")
    return built


def _check_trl_data(report: Report, recipe: dict) -> None:
    from grouprl.train_trl import TOY_DATASET

    value = str(recipe["dataset_path"])
    if value == TOY_DATASET:
        report.add("data", OK, "dataset_path: toy (embedded toy task)")
        return
    path = Path(value).expanduser()
    name = recipe.get("dataset_prepare")
    make = (f"make it with: grouprl data prepare {name} --out {value}" if name else
            "this recipe names no `grouprl data prepare` dataset: write a datasets save_to_disk folder with "
            "'prompt' and 'solution' columns (see docs/recipes.md)")
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            report.add("data", OK, f"dataset_path: {value}")
        else:
            report.add("data", FAIL, f"dataset_path {value} is not a datasets save_to_disk folder; {make}")
    elif looks_like_local_path(value) or path.exists():
        report.add("data", FAIL, f"dataset_path {value} does not exist; {make}")
    else:
        report.add("data", OK, f"dataset_path: {value} (hub dataset, loaded at launch)")


def _check_trl_resume(report: Report, recipe: dict) -> None:
    value = recipe.get("resume_from_checkpoint")
    if value in (None, ""):
        return
    from grouprl.train_trl import checkpoint_step, resolve_resume

    try:
        checkpoint = resolve_resume(value, str(recipe["output_dir"]))
    except FileNotFoundError as err:
        report.add("resume", FAIL, str(err))
        return
    report.add("resume", OK, f"from {checkpoint} (step {checkpoint_step(checkpoint)})")


def _preflight_trl(report: Report, recipe: dict, force: bool, machine_fn) -> None:
    missing = _check_extras(report, _trl_needs(recipe))
    uses_cpu = recipe.get("use_cpu") is True
    gpus = 0 if uses_cpu else int(recipe.get("num_processes", 1))
    if missing & set(TRL_MODULES):
        report.add("config", SKIP, "not built: install the missing packages above first")
    else:
        _check_trl_config(report, recipe)
    _check_trl_data(report, recipe)
    check_model(report, str(recipe["model_name_or_path"]), "model_name_or_path", embedded_tiny=True)
    if "transformers" not in missing:
        _check_trl_resume(report, recipe)
    _check_hardware(report, machine_fn, gpus, recipe.get("gpu_memory_gb"), force,
                    "With fewer GPUs set num_processes=N and raise gradient_accumulation_steps to keep the batch")


# ----------------------------------------------------------------------------- verl
def _override_key(item: str) -> str:
    return item.partition("=")[0]


def _has_key(cfg, dotted: str) -> bool:
    from omegaconf import DictConfig, OmegaConf

    parent, _, last = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and last in node.keys()  # keys() also lists ??? (missing) values


def _siblings(cfg, dotted: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    parent = dotted.rpartition(".")[0]
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node.keys()]


def _kind(value) -> str | None:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return None


def _compose_verl(report: Report, recipe: dict):
    """Hydra compose exactly as ``python -m <entry> --config-name <name> <overrides>`` would, after
    checking that every plain override names a key of the base config; then whether each keeps the
    base value's type. Returns (config or None, types ok)."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import OmegaConf

    algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
    overrides = recipes.verl_hydra_overrides(recipe)
    if algo.module == "grouprl_verl.main_ppo":
        from grouprl_verl.main_ppo import CONFIG_PATH

        context = initialize_config_dir(CONFIG_PATH, version_base=None)
    else:  # verl's own entry point and its packaged config
        context = initialize_config_module("verl.trainer.config", version_base=None)
    with context:
        base = compose(algo.config_name)
        problems = []
        for item in overrides:
            if item.startswith("+"):
                continue
            key = _override_key(item)
            if not _has_key(base, key):
                problems.append(f"{key}: not a key of verl's {algo.config_name} config"
                                f"{recipes.did_you_mean(key, _siblings(base, key))}")
        if problems:
            for problem in problems:
                report.add("config", FAIL, problem)
            return None, False
        cfg = compose(algo.config_name, overrides=overrides)
    typed = True
    for item in overrides:
        key = _override_key(item)
        if item.startswith("+"):
            continue
        wanted, value = _kind(OmegaConf.select(base, key)), OmegaConf.select(cfg, key)
        if wanted and value is not None and _kind(value) != wanted:
            report.add("config", FAIL, f"{key}={value!r}: expected {wanted} (the base config has "
                                       f"{OmegaConf.select(base, key)!r})")
            typed = False
    return cfg, typed


def _grouprl_blocks(recipe: dict) -> list[tuple[str, str, type]]:
    """(recipe section, Hydra path, options class) of the grouprl blocks the recipe's algorithm reads."""
    from grouprl_verl.config import ALGO_OPTIONS, GroupRLLossOptions

    algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
    blocks = []
    if algo.params:
        blocks.append(("grouprl_estimator", f"algorithm.grouprl.{algo.params}", ALGO_OPTIONS[algo.params]))
    blocks.append(("grouprl_policy_loss", "actor_rollout_ref.actor.policy_loss.grouprl", GroupRLLossOptions))
    return blocks


def _unknown_grouprl_keys(report: Report, keys, path: str, cls) -> bool:
    allowed = [f.name for f in fields(cls) if f.name != "_target_"]
    ok = True
    for key in keys:
        if key != "_target_" and key not in allowed:
            report.add("config", FAIL, f"{path}.{key}: unknown key{recipes.did_you_mean(str(key), allowed)}"
                                       f" (allowed: {', '.join(allowed)})")
            ok = False
    return ok


def _check_grouprl_sections(report: Report, recipe: dict) -> bool:
    """The recipe's ``grouprl_estimator`` / ``grouprl_policy_loss`` keys, before Hydra runs."""
    ok = True
    for section, path, cls in _grouprl_blocks(recipe):
        ok &= _unknown_grouprl_keys(report, recipe.get(section) or {}, path, cls)
    return ok


def _check_grouprl_blocks(report: Report, recipe: dict, cfg) -> bool:
    """``algorithm.grouprl.<algo>`` and ``...policy_loss.grouprl`` as composed (a ``++`` override may
    add keys too): known keys ("did you mean"), then grouprl_verl's own validation (types, ranges)."""
    from omegaconf import DictConfig, OmegaConf

    from grouprl_verl.config import algo_options, loss_options

    ok = True
    for _, path, cls in _grouprl_blocks(recipe):
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            ok &= _unknown_grouprl_keys(report, list(node.keys()), path, cls)
    if not ok:
        return False
    algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
    try:
        if algo.params:
            algo_options(cfg.algorithm, algo.params)
        loss_options(cfg.actor_rollout_ref.actor)
    except (ValueError, TypeError) as err:
        report.add("config", FAIL, str(err))
        return False
    return True


def _verl_validate(report: Report, recipe: dict, cfg) -> bool:
    """The checks verl's TaskRunner runs before it asks Ray for GPUs (verl 0.9.1 main_ppo_v0.py),
    plus grouprl_verl's ``check_config`` for our entry point."""
    algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
    try:
        # verl's internal helpers come through grouprl_verl._compat, which also refuses an unsupported verl version
        from grouprl_verl._compat import need_critic, need_reference_policy, validate_config

        if algo.module == "grouprl_verl.main_ppo":
            from grouprl_verl.main_ppo import check_config

            check_config(cfg)
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    except Exception as err:  # verl raises assertions, ValueErrors and Hydra InstantiationExceptions here
        report.add("config", FAIL, f"verl: {_first_line(err)}")
        return False
    return True


def _first_line(err: BaseException) -> str:
    """The message of the error that started it (Hydra wraps a config class's own error)."""
    cause = err.__cause__ or err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _verl_value(recipe: dict, cfg, key: str, default=None):
    if cfg is not None:
        from omegaconf import OmegaConf

        value = OmegaConf.select(cfg, key, default=default)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return recipe.get("overrides", {}).get(key, default)


def verl_prepare_commands(recipe: dict) -> dict[str, str]:
    """Output folder -> ``grouprl data prepare`` arguments for each entry of a verl recipe's ``prepare`` list.

    An entry is a dataset name (written to ``data/NAME``) or ``NAME --template T --out DIR``.
    """
    commands = {}
    for entry in recipe.get("prepare") or []:
        words = str(entry).split()
        out = words[words.index("--out") + 1] if "--out" in words[:-1] else f"data/{words[0]}"
        args = [w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out")]
        commands[str(Path(out))] = f"{' '.join(args)} --out {out}"
    return commands


def _check_verl_data(report: Report, recipe: dict, cfg) -> None:
    prepared = verl_prepare_commands(recipe)
    for key in ("data.train_files", "data.val_files"):
        value = _verl_value(recipe, cfg, key)
        if value in (None, "", []):
            report.add("data", FAIL, f"{key} is not set")
            continue
        for item in value if isinstance(value, list) else [value]:
            path = Path(str(item)).expanduser()
            if path.is_file():
                report.add("data", OK, f"{key}: {item}")
                continue
            command = prepared.get(str(path.parent))
            make = (f"make it with: grouprl data prepare {command} --format verl" if command else
                    "write a parquet in verl's RL schema (grouprl data prepare NAME --out DIR --format verl)")
            report.add("data", FAIL, f"{key}: {item} does not exist; {make}")


def _verl_length(get) -> str:
    steps = get("trainer.total_training_steps")
    return f"{steps} steps" if steps is not None else f"{get('trainer.total_epochs')} epochs"


def _verl_summary(recipe: dict, cfg) -> list[str]:
    algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
    get = lambda key, default=None: _verl_value(recipe, cfg, key, default)  # noqa: E731
    lines = [
        f"grouprl: {recipes.algorithm_name(recipe)} on verl (estimator {algo.adv_estimator}, policy loss "
        f"{algo.loss_mode}), recipe {recipe.get('recipe_name')}",
        f"  python -m {algo.module} --config-name {algo.config_name} (+ the Hydra overrides of the recipe)",
        f"  model {get('actor_rollout_ref.model.path')} | data {get('data.train_files')} | "
        f"output {recipes.output_dir_of(recipe)}",
        f"  {get('data.train_batch_size')} prompts x {get('actor_rollout_ref.rollout.n')} responses per step, "
        f"mini-batch {get('actor_rollout_ref.actor.ppo_mini_batch_size')}, lr {get('actor_rollout_ref.actor.optim.lr')}, "
        f"{_verl_length(get)}, {get('trainer.n_gpus_per_node')} GPUs x "
        f"{get('trainer.nnodes')} node(s)",
    ]
    for section, prefix in recipes.VERL_SECTION_PREFIX.items():
        path = prefix.format(params=algo.params)
        values = get(path) if cfg is not None and algo.params else recipe.get(section)
        if values:
            values = {k: v for k, v in values.items() if k != "_target_"}
            lines.append(f"  {path}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
    return lines


def _preflight_verl(report: Report, recipe: dict, force: bool, machine_fn) -> None:
    overrides = recipe.get("overrides", {})
    needs = [(m, "verl recipes") for m in VERL_MODULES]
    if str(overrides.get("reward.custom_reward_function.path", "")).startswith("pkg://grouprl.rewards"):
        needs.append(("math_verify", "reward.custom_reward_function grouprl.rewards"))
    if overrides.get("actor_rollout_ref.rollout.name") == "vllm":
        needs.append(("vllm", "actor_rollout_ref.rollout.name=vllm"))
    missing = _check_extras(report, needs)
    cfg = None
    if missing & set(VERL_MODULES):
        report.add("config", SKIP, "not composed: install the missing packages above first")
    else:
        with _quiet():
            sections_ok, typed = _check_grouprl_sections(report, recipe), False
            try:
                cfg, typed = _compose_verl(report, recipe)
            except recipes.RecipeError as err:
                report.add("config", FAIL, str(err))
            except Exception as err:  # Hydra's composition errors (bad override syntax, ...)
                report.add("config", FAIL, f"Hydra: {_first_line(err)}")
            blocks_ok = sections_ok and cfg is not None and _check_grouprl_blocks(report, recipe, cfg)
            if blocks_ok and typed and _verl_validate(report, recipe, cfg):
                algo = recipes.VERL_ALGORITHMS[recipe["algorithm"]]
                report.add("config", OK, f"Hydra composed {algo.config_name} with {len(overrides)} overrides; "
                                         "grouprl blocks and verl's validate_config passed")
    _check_verl_data(report, recipe, cfg)
    check_model(report, str(_verl_value(recipe, cfg, "actor_rollout_ref.model.path")), "actor_rollout_ref.model.path")
    gpus = int(_verl_value(recipe, cfg, "trainer.n_gpus_per_node", 8) or 0)
    nodes = int(_verl_value(recipe, cfg, "trainer.nnodes", 1) or 1)
    _check_hardware(report, machine_fn, gpus, recipe.get("gpu_memory_gb"), force,
                    "With fewer GPUs set trainer.n_gpus_per_node=N (train_batch_size x rollout.n must stay "
                    "divisible by it)", nodes)
    report.summary = _verl_summary(recipe, cfg)


# ----------------------------------------------------------------------------- entry point
def run(recipe: dict, force: bool = False, machine_fn=None) -> Report:
    """Check a resolved recipe (``grouprl.recipes.resolve``); never starts a process that trains or
    downloads. ``machine_fn`` replaces :func:`detect_machine` (tests)."""
    report = Report(str(recipe.get("recipe_name", "?")), recipe["backend"], recipes.algorithm_name(recipe))
    machine_fn = machine_fn or detect_machine
    environment = dict(os.environ)
    try:
        if recipe["backend"] == "trl":
            _preflight_trl(report, recipe, force, machine_fn)
        else:
            _preflight_verl(report, recipe, force, machine_fn)
    finally:
        # importing verl, Ray or transformers sets variables (TORCH_CUDA_ARCH_LIST, RAY_CLIENT_MODE, ...); the
        # launched run must see the user's environment, not what this check imported
        if dict(os.environ) != environment:
            os.environ.clear()
            os.environ.update(environment)
    return report

