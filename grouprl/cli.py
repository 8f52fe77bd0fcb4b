"""The ``grouprl`` console script.

    grouprl list                                   bundled recipes, one line each
    grouprl train RECIPE [key=value ...] [--dry-run] [--force]
    grouprl data ...                               -> grouprl.data.main
    grouprl eval ...                               -> grouprl.evaluate.main

``train`` resolves the recipe (bundled name or YAML path; ``base:`` overlays merged; dotted
``key=value`` overrides) and runs the preflight (:mod:`grouprl.preflight`: extras, config fields
and types, data, model, resume checkpoint, hardware). ``--dry-run`` prints the resolved recipe, the
command and the preflight report and starts nothing; a real launch stops on any preflight failure
before a process starts or a weight downloads (``--force`` skips only the hardware comparison).
Then it writes the recipe to ``<output_dir>/grouprl_recipe.yaml`` and runs it: TRL recipes through
``accelerate launch -m grouprl.train_trl`` (plain ``python -m grouprl.train_trl`` for one process
without an accelerate config, ``torchrun`` for several CPU processes), verl recipes through
``python -m grouprl_verl.main_ppo --config-name grouprl_<algo> key=value ...``. Only the preflight
imports torch, trl or verl.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys

from . import recipes
from .extras import missing_module_message


def _cmd_list(args) -> int:
    infos = recipes.list_recipes()
    width = max(len(info.name) for info in infos)
    for info in infos:
        print(f"{info.name:<{width}}  [{info.backend}]  {info.description}")
    return 0


def _cmd_train(args) -> int:
    from . import preflight

    try:
        recipe = recipes.resolve(args.recipe, args.overrides)
        resolved_path = recipes.output_dir_of(recipe) / recipes.RESOLVED_RECIPE_NAME
        command = recipes.build_command(recipe, resolved_path)
    except (recipes.RecipeError, FileNotFoundError) as err:
        print(f"grouprl train: {err}", file=sys.stderr)
        return 2
    report = preflight.run(recipe, force=args.force)
    if args.dry_run:
        print(f"# resolved recipe (would be written to {resolved_path})")
        print(recipes.dump(recipe), end="")
        print("# command")
        print(shlex.join(command))
        print("# preflight")
        print(report.render())
        return 1 if report.failures else 0
    print(report.render(), flush=True)
    if report.failures:
        return 1
    if report.summary:  # verl: ours, before Ray's and verl's output (TRL prints its own in grouprl.train_trl)
        print("\n".join(report.summary), flush=True)
    resolved_path.parent.mkdir(parents=True, exist_ok=True)
    resolved_path.write_text(recipes.dump(recipe))
    print(f"grouprl train: wrote {resolved_path}\n$ {shlex.join(command)}", flush=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.call(command, env=env)


def _delegate(module_name: str, argv: list[str]) -> int:
    """Hand the remaining arguments to ``<module>.main(argv)`` (imported only now)."""
    module = importlib.import_module(module_name)
    return int(module.main(argv) or 0)


def build_train_parser() -> argparse.ArgumentParser:
    train = argparse.ArgumentParser(prog="grouprl train", description="Run a bundled recipe or a recipe YAML.")
    train.add_argument("recipe", help="bundled recipe name (see `grouprl list`) or a path to a recipe YAML")
    train.add_argument("overrides", nargs="*", help="key=value overrides; dotted keys reach into mappings; "
                                                    "resume_from_checkpoint=PATH|last continues a TRL run")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved recipe, the command and the preflight report; run nothing")
    train.add_argument("--force", action="store_true",
                       help="launch although this machine has fewer or smaller GPUs than the recipe needs "
                            "(skips only the preflight's hardware comparison)")
    return train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grouprl", description="GPG, GCPO-gold, COPO and GCPO-guidance recipes for TRL and verl")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the bundled recipes").set_defaults(func=_cmd_list)
    sub.add_parser("train", help="check and run a recipe (bundled name or YAML path); grouprl train --help",
                   add_help=False)
    sub.add_parser("data", help="prepare datasets (grouprl data --help)", add_help=False)
    sub.add_parser("eval", help="evaluate a checkpoint (grouprl eval --help)", add_help=False)
    return parser


def _main(argv: list[str]) -> int:
    # data/eval own their arguments: pass everything after the subcommand through untouched.
    if argv and argv[0] == "data":
        return _delegate("grouprl.data", argv[1:])
    if argv and argv[0] == "eval":
        return _delegate("grouprl.evaluate", argv[1:])
    if argv and argv[0] == "train":  # intermixed: --dry-run may come after the overrides
        return _cmd_train(build_train_parser().parse_intermixed_args(argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here at the latest
        return code
    except ModuleNotFoundError as err:
        message = missing_module_message(err, f"grouprl {argv[0] if argv else ''}".strip())
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader stopped early (`grouprl list | head`): point stdout at devnull so that the
        # interpreter's final flush does not raise again, and stop quietly (Python docs, "SIGPIPE")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
