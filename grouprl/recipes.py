"""Bundled training recipes: find, load (with ``base:`` overlays), override, and turn into a command.

A recipe is one YAML file under ``grouprl/recipes/trl/`` or ``grouprl/recipes/verl/`` (shipped as
package data, so a non-editable ``pip install`` finds them too). Its name is the file stem.

TRL recipes are *flat*, like TRL's own ``trl grpo --config`` files: every key is a field of
:class:`grouprl.train_trl.RecipeArguments` (launcher fields such as ``trainer``, ``reward_funcs``,
``dataset_path``), of the trainer's config class (``GPGConfig``, ``GRPOConfig``, ...) or of TRL's
``ModelConfig``; :mod:`grouprl.train_trl` parses them with ``TrlParser``.

verl recipes name an ``algorithm`` and hold verl's own dotted Hydra keys under ``overrides``; the
algorithm's own parameters sit in two sections whose Hydra prefixes are defined once, in
:data:`VERL_SECTION_PREFIX`.

This module imports neither torch nor trl (the CLI must start fast).
"""

from __future__ import annotations

import copy
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from grouprl_core.algorithms import ALGORITHMS, GRPO, VerlKeys

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
BACKENDS = ("trl", "verl")
ACCELERATE_DIR = RECIPES_DIR / "accelerate"
RESOLVED_RECIPE_NAME = "grouprl_recipe.yaml"

# ----------------------------------------------------------------------------- verl names (one place)
# The algorithm's own parameters are written in a recipe under two sections and passed to Hydra
# under these prefixes ({params} is the algorithm's block name in grouprl_verl's base configs,
# grouprl_verl/configs/grouprl_<algo>.yaml: algorithm.grouprl.gpg.*, ...).
VERL_SECTION_PREFIX = {
    "grouprl_estimator": "algorithm.grouprl.{params}",
    "grouprl_policy_loss": "actor_rollout_ref.actor.policy_loss.grouprl",
}


#: verl names of every algorithm a verl recipe can name (its ``algorithm``), from grouprl_core's table:
#: entry point (``module``), Hydra config, estimator, policy loss and options block (``params``).
VERL_ALGORITHMS: dict[str, VerlKeys] = {key: algo.verl for key, algo in ALGORITHMS.items()}
VERL_ALGORITHMS[GRPO.key] = GRPO.verl

#: Algorithm names as the papers write them: by TRL trainer class, and by verl recipe ``algorithm``.
TRAINER_ALGORITHMS = {algo.trl_trainer: algo.label for algo in ALGORITHMS.values()}
TRAINER_ALGORITHMS[GRPO.trl_trainer] = f"{GRPO.label} (TRL baseline)"
VERL_ALGORITHM_NAMES = {key: algo.label for key, algo in ALGORITHMS.items()}
VERL_ALGORITHM_NAMES[GRPO.key] = f"{GRPO.label} (verl baseline)"


def algorithm_name(recipe: dict) -> str:
    """``GPG``, ``GCPO-gold``, ... for a resolved recipe (the trainer class name when unknown)."""
    if recipe["backend"] == "verl":
        return VERL_ALGORITHM_NAMES.get(recipe.get("algorithm"), str(recipe.get("algorithm")))
    cls = str(recipe.get("trainer", "")).rpartition(".")[2]
    return TRAINER_ALGORITHMS.get(cls, cls)


class RecipeError(ValueError):
    """A recipe (or an override) is malformed; the message names the field and the fix."""


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    backend: str
    path: Path
    description: str


# ----------------------------------------------------------------------------- discovery
def recipe_paths(include_bases: bool = False) -> dict[str, Path]:
    """Bundled recipe name -> path (names are unique across backends). Files whose name starts with
    ``_`` are bases for overlays: usable as ``base:`` but not listed as recipes."""
    found: dict[str, Path] = {}
    for backend in BACKENDS:
        for path in sorted((RECIPES_DIR / backend).glob("*.yaml")):
            if path.stem.startswith("_") and not include_bases:
                continue
            if path.stem in found:
                raise RecipeError(f"two bundled recipes are named {path.stem!r}: {found[path.stem]} and {path}")
            found[path.stem] = path
    return found


def list_recipes() -> list[RecipeInfo]:
    """Every bundled recipe with its backend and one-line description (bases/overlays resolved)."""
    infos = []
    for name, path in recipe_paths().items():
        recipe = load_recipe(path)
        infos.append(RecipeInfo(name, recipe["backend"], path, str(recipe.get("description", "")).strip()))
    return infos


def find_recipe(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file from a bundled name (``gpg_rs1_1p5b``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if relative_to is not None and not candidate.is_absolute():
        near = relative_to / candidate
        if near.is_file():
            return near.resolve()
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    bundled = recipe_paths(include_bases=True)
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    listed = [name for name in bundled if not name.startswith("_")]
    raise RecipeError(
        f"recipe {str(name_or_path)!r} not found{did_you_mean(str(name_or_path), listed)}: give a bundled name "
        "(see `grouprl list`) or a path to a YAML file"
    )


def did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# ----------------------------------------------------------------------------- loading and merging
def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict:
    with open(path) as handle:
        data = yaml.safe_load(handle)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(name_or_path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe with its ``base:`` chain merged in (the file's own keys win); ``base`` is removed.

    ``base`` is a bundled name or a path relative to the overlay file.
    """
    path = find_recipe(name_or_path, relative_to=_chain[-1].parent if _chain else None)
    if path in _chain:
        raise RecipeError(f"recipe base cycle: {' -> '.join(str(p.name) for p in (*_chain, path))}")
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is not None:
        data = deep_merge(load_recipe(base_name, (*_chain, path)), data)
    if not _chain:
        backend = data.get("backend")
        if backend not in BACKENDS:
            raise RecipeError(f"{path}: field 'backend' must be one of {BACKENDS}, got {backend!r}")
        data.setdefault("recipe_name", path.stem)
    return data


YAML11_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def parse_override_value(text: str):
    """A command-line value as YAML (``true``, ``[1, 2]``, ``null``), plus ``1e-6``-style floats.

    ``no``/``yes``/``on``/``off`` stay strings (``save_strategy=no``); only ``true``/``false`` are booleans.
    """
    if text.strip().lower() in YAML11_BOOL_WORDS:
        return text
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """``key=value`` overrides. TRL: dotted keys reach into mappings (``lr_scheduler_kwargs.min_lr_rate=0.2``).
    verl: a key that is not a recipe field is a Hydra key and goes to ``overrides`` verbatim
    (``data.train_batch_size=64``); ``grouprl_estimator.valid_threshold=0.5`` edits a section.
    """
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form key=value")
        try:
            value = parse_override_value(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})") from err
        parts = key.split(".")
        if recipe["backend"] == "verl" and parts[0] not in recipe and parts[0] not in VERL_SECTION_PREFIX:
            recipe.setdefault("overrides", {})[key] = value
            continue
        node = recipe
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} holds {child!r}, not a mapping")
            node = child
        node[parts[-1]] = value
    return recipe


def resolve(name_or_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Load, merge bases, apply overrides and check the launcher fields."""
    recipe = apply_overrides(load_recipe(name_or_path), list(overrides or []))
    check_launcher_fields(recipe)
    return recipe


def check_launcher_fields(recipe: dict) -> None:
    """Errors for launcher fields; the trainer's own fields are checked by its config class."""
    name = recipe.get("recipe_name", "?")
    if recipe["backend"] == "trl":
        for key in ("trainer", "model_name_or_path", "dataset_path", "reward_funcs", "output_dir"):
            if key not in recipe:
                raise RecipeError(f"recipe {name}: TRL recipes need the field {key!r}")
        processes = recipe.get("num_processes", 1)
        if not isinstance(processes, int) or processes < 1:
            raise RecipeError(f"recipe {name}: num_processes must be an integer >= 1, got {processes!r}")
        if processes > 1 and not recipe.get("accelerate_config") and recipe.get("use_cpu") is not True:
            raise RecipeError(
                f"recipe {name}: num_processes={processes} needs accelerate_config (e.g. zero2), or use_cpu=true "
                "for CPU processes"
            )
    else:
        algorithm = recipe.get("algorithm")
        if algorithm not in VERL_ALGORITHMS:
            raise RecipeError(f"recipe {name}: 'algorithm' must be one of {list(VERL_ALGORITHMS)}, got {algorithm!r}")
        if not isinstance(recipe.get("overrides", {}), dict):
            raise RecipeError(f"recipe {name}: 'overrides' must be a mapping of Hydra keys to values")
        for section in VERL_SECTION_PREFIX:
            if not isinstance(recipe.get(section, {}), dict):
                raise RecipeError(f"recipe {name}: {section!r} must be a mapping of parameter names to values")


# ----------------------------------------------------------------------------- commands
def accelerate_config_path(value: str) -> Path:
    """A bundled accelerate config name (``zero2``, ``zero3``) or a path."""
    bundled = ACCELERATE_DIR / f"{value}.yaml"
    if bundled.is_file():
        return bundled
    path = Path(value)
    if path.is_file():
        return path.resolve()
    names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise RecipeError(f"accelerate_config {value!r} is neither a bundled config {names} nor a file")


def _hydra_value(value) -> str:
    """A Python value written as a Hydra command-line value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if any(ch in text for ch in " ,=[]{}()'\"\\:$*?<>|&;#") and not text.startswith(("pkg://", "file://")):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return text


def verl_hydra_overrides(recipe: dict) -> list[str]:
    """The Hydra ``key=value`` list of a verl recipe.

    The estimator and loss names come from :data:`VERL_ALGORITHMS`; section parameters use ``++``
    (add or override), so they compose both onto verl's bare ``ppo_trainer`` and onto grouprl_verl's
    base configs, which already declare them.
    """
    algo = VERL_ALGORITHMS[recipe["algorithm"]]
    items = {"algorithm.adv_estimator": algo.adv_estimator, "actor_rollout_ref.actor.policy_loss.loss_mode": algo.loss_mode}
    items.update(recipe.get("overrides", {}))
    out = [f"{key}={_hydra_value(value)}" for key, value in items.items()]
    for section, prefix in VERL_SECTION_PREFIX.items():
        params = recipe.get(section, {})
        if params and algo.params is None:
            raise RecipeError(f"recipe {recipe.get('recipe_name')}: algorithm {recipe['algorithm']!r} takes no {section}")
        for key, value in params.items():
            out.append(f"++{prefix.format(params=algo.params)}.{key}={_hydra_value(value)}")
    return out


def output_dir_of(recipe: dict) -> Path:
    if recipe["backend"] == "trl":
        return Path(recipe["output_dir"])
    local_dir = recipe.get("overrides", {}).get("trainer.default_local_dir")
    return Path(local_dir or f"outputs/{recipe['recipe_name']}")


def build_command(recipe: dict, resolved_path: Path) -> list[str]:
    """The exact command that runs the resolved recipe."""
    if recipe["backend"] == "verl":
        algo = VERL_ALGORITHMS[recipe["algorithm"]]
        return [sys.executable, "-m", algo.module, f"--config-name={algo.config_name}", *verl_hydra_overrides(recipe)]
    script = ["-m", "grouprl.train_trl", "--config", str(resolved_path)]
    processes = int(recipe.get("num_processes", 1))
    if processes == 1 and not recipe.get("accelerate_config"):
        return [sys.executable, *script]
    if not recipe.get("accelerate_config"):
        # CPU processes (use_cpu: true, checked above). accelerate launch starts several CPU processes on
        # one machine only through mpirun; torchrun starts them directly, and accelerate's PartialState
        # then runs them as MULTI_CPU with the gloo backend (WORLD_SIZE > 1, use_cpu).
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                *script]
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_path(recipe["accelerate_config"])),
        "--num_processes", str(processes),
        *script,
    ]


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=120)
