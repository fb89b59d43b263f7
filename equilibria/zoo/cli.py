"""The ``equilibria`` command line.

::

    equilibria train RECIPE [--option value ...]     train; writes a run folder
    equilibria eval CHECKPOINT [options]             rebuild a model from its saved config; test
    equilibria compare-gradients RECIPE [options]    backward methods side by side
    equilibria sweep RECIPE [options]                variants x seeds -> mean ± std table
    equilibria demo [--quiet]                        the three-minute tour (``make demo``)
    equilibria report RUN_DIR                        (re)write a run's report.md and plots
    equilibria denoise IN --output OUT [--sigma S]   denoise an image file (shipped model)
    equilibria recipes                               list the recipes

``equilibria train RECIPE --help`` lists the recipe's options with types, defaults and allowed
values; an unknown, invalid or repeated option fails with the same list. ``python -m
equilibria`` and ``torchrun --nproc-per-node N -m equilibria train RECIPE`` run the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, OptionParser, add_arguments, parse_options, refuse_repeats
from .denoise_cli import add_denoise_parser, run_denoise
from .registry import RECIPES, Recipe, RecipeError, get_recipe

PROG = "equilibria"


def _recipe_table() -> str:
    width = max(len(n) for n in RECIPES)
    return "\n".join(f"  {name:<{width}}  {r.summary}" for name, r in RECIPES.items())


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, evaluate and compare implicit (deep equilibrium) models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"recipes:\n{_recipe_table()}\n\n"
        f"`{PROG} train RECIPE --help` lists a recipe's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a recipe; writes a run folder", add_help=False)
    train.add_argument("-h", "--help", action="store_true", help="list the recipes")
    train.add_argument("recipe", nargs="?", help=f"one of: {', '.join(RECIPES)}")
    train.add_argument("options", nargs=argparse.REMAINDER)
    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint (model rebuilt from its config)", add_help=False
    )
    ev.add_argument("-h", "--help", action="store_true", help="list the options")
    ev.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint.safetensors or its folder")
    ev.add_argument("options", nargs=argparse.REMAINDER)
    sw = sub.add_parser("sweep", help="variants x seeds of a recipe; one table", add_help=False)
    sw.add_argument("-h", "--help", action="store_true", help="list the recipes")
    sw.add_argument("recipe", nargs="?")
    sw.add_argument("options", nargs=argparse.REMAINDER)
    cmp = sub.add_parser(
        "compare-gradients", help="train with every backward method; one table", add_help=False
    )
    cmp.add_argument("-h", "--help", action="store_true", help="list the recipes")
    cmp.add_argument("recipe", nargs="?")
    cmp.add_argument("options", nargs=argparse.REMAINDER)
    demo = sub.add_parser("demo", help="train the digits DEQ with a phantom gradient (make demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--run-dir", default="", help="run folder (default: runs/demo/<timestamp>)")
    demo.add_argument("--epochs", type=int, help="override the number of epochs")
    rep = sub.add_parser("report", help="(re)write report.md and plots of a run folder")
    rep.add_argument("run_dir", type=Path)
    sub.add_parser("recipes", help="list the recipes")
    add_denoise_parser(sub)
    return parser


def _recipe_help(recipe: Recipe, command: str, cls: type) -> str:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {command} {recipe.name}",
        description=recipe.summary if command == "train" else cls.__doc__,
        add_help=False,
    )
    add_arguments(parser, cls)
    return parser.format_help().replace("runs/RECIPE/", f"runs/{recipe.name}/")


def _train(recipe: Recipe, options: list[str]) -> int:
    task_cls = recipe.task_class()
    cls = task_cls.config_class
    if any(o in ("-h", "--help") for o in options):
        print(_recipe_help(recipe, "train", cls))
        return 0
    from .runs import require_extras
    from .trainer import train

    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1") and not task_cls.distributed:
        supported = [r.name for r in RECIPES.values() if r.task_class().distributed]
        raise ConfigError(
            f"recipe {recipe.name!r} has no distributed training, got WORLD_SIZE={world}; run it "
            f"as a single process (recipes that train under torchrun: "
            f"{', '.join(supported) or 'none'})"
        )
    for i, option in enumerate(options):  # '' is the default (a new timestamped folder)
        if option == "--run-dir=" or (option == "--run-dir" and options[i + 1 : i + 2] == [""]):
            raise ConfigError("--run-dir needs a folder, e.g. --run-dir runs/mine")
    config = parse_options(cls, options, prog=f"{PROG} train {recipe.name}")
    require_extras(*task_cls.extras)  # before anything is written
    summary = train(task_cls(config))
    if _is_main():
        from .report import format_summary

        print(format_summary(task_cls, summary))
    return 0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .evaluation import evaluate_checkpoint
    from .report import format_eval
    from .runs import require_extras

    if args.checkpoint is None or args.help:
        print(f"usage: {PROG} eval CHECKPOINT [--json] [options the recipe allows to override]")
        if args.help:
            return 0
        raise ConfigError(
            "eval needs a CHECKPOINT: a checkpoint.safetensors file or its run folder"
        )
    require_extras("safetensors")
    ckpt = load_checkpoint(args.checkpoint)  # read and verified once
    recipe = get_recipe(ckpt.recipe)
    task_cls = recipe.task_class()
    require_extras(*task_cls.extras)
    parser = OptionParser(prog=f"{PROG} eval CHECKPOINT", add_help=False, allow_abbrev=False)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_arguments(parser, task_cls.config_class, only=task_cls.eval_options)
    namespace, rest = parser.parse_known_args(args.options)
    if rest:
        allowed = ["--json", *("--" + f.replace("_", "-") for f in task_cls.eval_options)]
        raise ConfigError(
            f"eval of a {recipe.name} checkpoint: unknown option(s) {rest}; allowed: "
            f"{', '.join(allowed)}"
        )
    opts = vars(namespace)
    as_json = opts.pop("json")
    result = evaluate_checkpoint(task_cls, ckpt, **opts)
    print(json.dumps(result, indent=2) if as_json else format_eval(task_cls, result))
    return 0


def _compare(recipe: Recipe, options: list[str]) -> int:
    cls, fn = recipe.compare_entry()
    if any(o in ("-h", "--help") for o in options):
        print(_recipe_help(recipe, "compare-gradients", cls))
        return 0
    config = parse_options(cls, options, prog=f"{PROG} compare-gradients {recipe.name}")
    result = fn(config)
    print(result["markdown"])
    print(f"\nwritten: {result['compare_md']} and {result['compare_json']}")
    return 0


def _sweep(recipe: Recipe, options: list[str]) -> int:
    from .sweep import SweepConfig, run_sweep

    task_cls = recipe.task_class()
    if any(o in ("-h", "--help") for o in options):
        prog = f"{PROG} sweep {recipe.name}"
        text = SweepConfig.parser(task_cls, prog=prog).format_help()
        print(text.replace("RECIPE", recipe.name))
        print(f"variants of {recipe.name}: {', '.join(task_cls.variants) or 'none'}")
        return 0
    sweep, base = SweepConfig.parse(task_cls, options, prog=f"{PROG} sweep {recipe.name}")

    def progress(variant: str, seed: int) -> None:
        print(f"[{variant}] seed {seed}", flush=True)

    result = run_sweep(task_cls, sweep, base, progress=progress)
    print(result.markdown)
    print(f"\nwritten: {result.root / 'sweep.md'} and {result.root / 'sweep.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``equilibria`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    args = parser.parse_args(argv)
    try:
        refuse_repeats(argv)  # every command: argparse would keep the last one silently
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "recipes":
            print(_recipe_table())
            return 0
        if args.command in ("train", "compare-gradients", "sweep"):
            if args.recipe is None:  # the recipe list: asked for (--help) or missing
                print(f"usage: {PROG} {args.command} RECIPE [options]\n\nrecipes:")
                print(_recipe_table())
                print(f"\n`{PROG} {args.command} RECIPE --help` lists a recipe's options.")
                if args.help:
                    return 0
                raise ConfigError(f"{args.command} needs a RECIPE: one of {', '.join(RECIPES)}")
            recipe = get_recipe(args.recipe)
            options = ["--help"] if args.help else args.options  # `train --help digits` too
            if args.command == "train":
                return _train(recipe, options)
            return _compare(recipe, options) if args.command == "compare-gradients" else _sweep(
                recipe, options
            )  # fmt: skip
        if args.command == "eval":
            return _eval(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(run_dir=args.run_dir, quiet=args.quiet, epochs=args.epochs)
        if args.command == "denoise":
            return run_denoise(args)
        if args.command == "report":
            from .report import ReportError, write_report

            try:
                print(write_report(args.run_dir))
            except ReportError as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
                return 2
            return 0
    except (ConfigError, RecipeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the shell's status for SIGINT
        print(
            f"{PROG}: interrupted (a run folder keeps its last checkpoint: --resume continues it)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        from .checkpoint import CheckpointError
        from .runs import MissingExtraError, ReportFailedError, RunFailedError, RunFolderError

        known = (CheckpointError, MissingExtraError, ReportFailedError, RunFailedError,
                 RunFolderError, OSError)  # fmt: skip
        if isinstance(e, known):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command!r}")


__all__ = ["main"]
