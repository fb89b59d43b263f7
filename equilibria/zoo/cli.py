"""The ``equilibria`` command line.

::

    equilibria train RECIPE [--option value ...]     train; writes a run folder
    equilibria eval CHECKPOINT [--eval-max-iter N]   rebuild a model from its saved config; test
    equilibria compare-gradients RECIPE [options]    backward methods side by side
    equilibria demo [--quiet]                        the three-minute tour (``make demo``)
    equilibria report RUN_DIR                        (re)write a run's report.md and plots
    equilibria recipes                               list the recipes

``equilibria train RECIPE --help`` lists the recipe's options with types, defaults and allowed
values; an unknown or invalid option fails with the same list. ``python -m equilibria`` and
``torchrun --nproc-per-node N -m equilibria train RECIPE`` run the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, add_arguments, parse_options, to_dict
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
    ev = sub.add_parser("eval", help="evaluate a checkpoint (model rebuilt from its config)")
    ev.add_argument("checkpoint", type=Path, help="checkpoint.safetensors or its run folder")
    ev.add_argument("--eval-max-iter", type=int, help="override the saved evaluation budget")
    ev.add_argument("--eval-tol", type=float, help="override the saved evaluation tolerance")
    ev.add_argument("--solver", help="override the saved forward solver")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
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
    return parser


def _recipe_help(recipe: Recipe, command: str, cls: type) -> str:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {command} {recipe.name}",
        description=recipe.summary if command == "train" else cls.__doc__,
        add_help=False,
    )
    add_arguments(parser, cls)
    if command == "train" and not recipe.run_folder:
        parser.add_argument(
            "--run-dir", help="write config.json and summary.json here (default: runs/NAME/<time>)"
        )
    return parser.format_help()


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for a digits-style training summary."""
    if "test_acc" not in summary or "eval_iters" not in summary:
        return json.dumps(summary, indent=2, default=str)
    cfg = summary.get("config", {})
    lines = [
        f"{summary.get('recipe', '')}: test accuracy {100 * summary['test_acc']:.2f}% after "
        f"{summary.get('epochs')} epochs (training {_fmt(summary.get('train_time_s'), '.1f')} s, "
        f"wall {_fmt(summary.get('wall_time_s'), '.1f')} s, {summary.get('threads')} thread(s), "
        f"{summary.get('world_size', 1)} process(es), {summary.get('device')})",
        f"forward solver {summary.get('solver')}: "
        f"{_fmt(summary.get('fwd_iters_mean'), '.1f')} iterations per training step "
        f"(largest residual {_fmt(summary.get('fwd_residual_max'), '.1e')}), "
        f"{summary['eval_iters']} on the test set (largest residual "
        f"{summary['eval_residual_max']:.1e}, {100 * summary['eval_converged']:.0f}% of samples "
        f"below tol {cfg.get('eval_tol', '?')})",
        f"backward {summary.get('backward')}: {_fmt(summary.get('bwd_iters_mean'), '.1f')} "
        f"iterations per step; {_fmt(summary.get('step_ms'), '.1f')} ms per training step "
        "(median, last epoch)",
        f"peak training-step memory {_fmt(summary.get('peak_mem_mb'), '.2f')} MB "
        f"({summary.get('mem_method') or 'not measured'})",
        f"run folder: {summary.get('run_dir')}",
    ]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def format_eval(result: dict[str, Any]) -> str:
    """Human-readable lines for an evaluation result."""
    return (
        f"{result['checkpoint']}: test accuracy {100 * result['test_acc']:.2f}% "
        f"(loss {result['test_loss']:.4f})\n"
        f"forward solver {result['solver']}: {result['eval_iters']} iterations "
        f"(budget {result['eval_max_iter']}, tol {result['eval_tol']:g}), largest residual "
        f"{result['eval_residual_max']:.2e}, {100 * result['eval_converged']:.0f}% of samples "
        f"converged; {result['eval_time_s']:.2f} s"
    )


def _train(recipe: Recipe, options: list[str]) -> int:
    cls = recipe.config_class()
    if any(o in ("-h", "--help") for o in options):
        print(_recipe_help(recipe, "train", cls))
        return 0
    from .runs import require_extras

    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1") and not recipe.distributed:
        supported = [r.name for r in RECIPES.values() if r.distributed]
        raise ConfigError(
            f"recipe {recipe.name!r} has no distributed training, got WORLD_SIZE={world}; run it "
            f"as a single process (recipes that train under torchrun: "
            f"{', '.join(supported) or 'none'})"
        )
    given = sum(o == "--run-dir" or o.startswith("--run-dir=") for o in options)
    if given > 1:  # argparse would silently keep the last one
        raise ConfigError(f"--run-dir given {given} times; give one folder")
    run_dir = None
    if not recipe.run_folder:  # the recipe has no run folder of its own: config + summary here
        from .runs import default_run_dir

        options, given = _pop_run_dir(options)
        run_dir = default_run_dir(recipe.name) if given is None else Path(given)
    config = parse_options(cls, options, prog=f"{PROG} train {recipe.name}")
    require_extras(*recipe.extras)  # before anything is written
    if run_dir is None:
        summary = recipe.train_function()(config)
    else:
        from .runs import RunFolder, write_json

        run = RunFolder(run_dir)
        run.start(recipe.name, to_dict(config), resumable=recipe.resumable)
        try:
            summary = recipe.train_function()(config)
        except Exception as e:  # recorded in the folder, so a rerun there says what happened
            raise run.fail(e) from e
        write_json(run_dir / "summary.json", summary)
        print(f"run folder: {run_dir}")
    if _is_main():
        print(format_summary(summary))
    return 0


def _pop_run_dir(options: list[str]) -> tuple[list[str], str | None]:
    """Take ``--run-dir DIR`` or ``--run-dir=DIR`` out of ``options`` (given at most once)."""
    count = sum(o == "--run-dir" or o.startswith("--run-dir=") for o in options)
    if count > 1:
        raise ConfigError(f"--run-dir given {count} times; give one folder")
    for i, o in enumerate(options):
        if o == "--run-dir":
            if i + 1 >= len(options) or options[i + 1].startswith("-"):
                raise ConfigError("--run-dir needs a folder, e.g. --run-dir runs/mine")
            return options[:i] + options[i + 2 :], options[i + 1]
        if o.startswith("--run-dir="):
            value = o.split("=", 1)[1]
            if not value:
                raise ConfigError("--run-dir needs a folder, got an empty --run-dir=")
            return options[:i] + options[i + 1 :], value
    return options, None


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .runs import require_extras

    require_extras("safetensors", "sklearn")  # the checkpoint and the test images
    ckpt = load_checkpoint(args.checkpoint)
    recipe = get_recipe(ckpt.recipe)
    overrides = {
        k: v
        for k, v in (
            ("eval_max_iter", args.eval_max_iter),
            ("eval_tol", args.eval_tol),
            ("solver", args.solver),
        )
        if v is not None
    }
    result = recipe.evaluate_function()(args.checkpoint, **overrides)
    print(json.dumps(result, indent=2) if args.json else format_eval(result))
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``equilibria`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "recipes":
            print(_recipe_table())
            return 0
        if args.command in ("train", "compare-gradients"):
            if args.recipe is None:  # the recipe list: asked for (--help) or missing
                print(f"usage: {PROG} {args.command} RECIPE [options]\n\nrecipes:")
                print(_recipe_table())
                print(f"\n`{PROG} {args.command} RECIPE --help` lists a recipe's options.")
                return 0 if args.help else 2
            recipe = get_recipe(args.recipe)
            options = ["--help"] if args.help else args.options  # `train --help digits` too
            if args.command == "train":
                return _train(recipe, options)
            return _compare(recipe, options)
        if args.command == "eval":
            return _eval(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(run_dir=args.run_dir, quiet=args.quiet, epochs=args.epochs)
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
    except Exception as e:
        from .checkpoint import CheckpointError
        from .runs import MissingExtraError, ReportFailedError, RunFailedError

        if isinstance(e, (CheckpointError, MissingExtraError, ReportFailedError, RunFailedError)):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        raise
    parser.error(f"unknown command {args.command!r}")


__all__ = ["format_eval", "format_summary", "main"]
