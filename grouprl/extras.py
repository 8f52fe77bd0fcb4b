"""Which ``pip install "grouprl[EXTRA]"`` brings an optional module, and the message that says so.

grouprl's core needs only torch, tqdm and pyyaml; every backend comes from an extra declared in
``pyproject.toml``. A ``ModuleNotFoundError`` for one of those modules should name the extra to
install, not just the module (``No module named 'hydra'`` says nothing to someone who installed
``grouprl[trl]`` and picked a verl recipe). No heavy imports here.
"""

from __future__ import annotations

import importlib.util

#: top-level module -> the extras (in ``pyproject.toml``) that install it, first = the one to suggest.
MODULE_EXTRAS: dict[str, tuple[str, ...]] = {
    "trl": ("trl",),
    "transformers": ("trl",),
    "accelerate": ("trl",),
    "datasets": ("trl",),
    "matplotlib": ("trl",),
    "math_verify": ("trl", "verl"),
    "verl": ("verl",),
    "hydra": ("verl",),
    "omegaconf": ("verl",),
    "ray": ("verl",),
    "deepspeed": ("gpu",),
    "vllm": ("gpu", "vllm"),
}

#: modules no extra installs (their own build steps), with the command that does.
MODULE_COMMANDS: dict[str, str] = {
    "flash_attn": "pip install flash-attn --no-build-isolation",
    "peft": "pip install peft",
}


def install_command(module: str) -> str | None:
    """The command that installs ``module`` (top-level name), or None if grouprl does not know it."""
    top = module.split(".")[0]
    if top in MODULE_EXTRAS:
        return f'pip install "grouprl[{MODULE_EXTRAS[top][0]}]"'
    return MODULE_COMMANDS.get(top)


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported (found on the path, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] is None
        return False


def missing_module_message(err: ModuleNotFoundError, what: str = "this command") -> str | None:
    """A one-line fix for ``err`` when the missing module belongs to an extra, else None."""
    name = err.name or ""
    command = install_command(name)
    if command is None:
        return None
    return f"{what} needs the Python package {name.split('.')[0]!r}, which is not installed: {command}"
