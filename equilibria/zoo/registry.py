"""The recipe registry: recipe name -> config dataclass + train function (+ optional eval/compare).

Entries name their module and attributes as strings and are imported only when used, so listing
the recipes (``equilibria --help``) stays fast and one broken recipe does not break the others.

A recipe module provides:

* a frozen config dataclass (validated in ``__post_init__``; its fields are the CLI options),
* ``train(config) -> dict``: runs training and returns a JSON-ready summary,
* optionally ``evaluate(checkpoint, ...) -> dict`` for ``equilibria eval`` and
  ``compare_gradients(config) -> dict`` for ``equilibria compare-gradients``.

Register a new one with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A registered recipe.

    Attributes:
        name: the name used on the command line (``equilibria train NAME``).
        summary: one line for the recipe table in ``--help``.
        module: import path of the module that implements it.
        config: name of its config dataclass in ``module``.
        train: name of its ``train(config) -> dict`` function.
        evaluate: name of its ``evaluate(checkpoint, ...) -> dict`` function, if any.
        compare_gradients: where its gradient comparison lives, as
            ``"module:ConfigClass:function"``, if it has one.
        run_folder: whether ``train`` writes its own run folder (its config then has ``run_dir``);
            if not, the CLI writes ``config.json`` and ``summary.json`` into ``--run-dir``.
        extras: optional modules (the ``zoo`` extra) a training run needs; the CLI imports them
            before it writes anything, so a missing one fails early with a clear error.
        distributed: whether ``train`` supports data-parallel training under ``torchrun``
            (``WORLD_SIZE > 1``); if not, the CLI refuses to run on several processes.
        resumable: whether the config has ``resume`` (a stopped run can be continued).
    """

    name: str
    summary: str
    module: str
    config: str
    train: str = "train"
    evaluate: str | None = None
    compare_gradients: str | None = None
    run_folder: bool = True
    extras: tuple[str, ...] = ()
    distributed: bool = False
    resumable: bool = False

    def _attr(self, name: str, module_name: str | None = None) -> Any:
        module_name = self.module if module_name is None else module_name
        module = importlib.import_module(module_name)
        try:
            return getattr(module, name)
        except AttributeError:
            raise RecipeError(
                f"recipe {self.name!r}: module {module_name} has no attribute {name!r}"
            ) from None

    def config_class(self) -> type:
        """The config dataclass (imports the recipe module)."""
        cls = self._attr(self.config)
        if not dataclasses.is_dataclass(cls):
            raise RecipeError(f"recipe {self.name!r}: {self.module}.{self.config} is no dataclass")
        return cls  # type: ignore[return-value]

    def train_function(self) -> Callable[[Any], dict[str, Any]]:
        """The ``train(config) -> dict`` function (imports the recipe module)."""
        return self._attr(self.train)

    def evaluate_function(self) -> Callable[..., dict[str, Any]]:
        """The ``evaluate(checkpoint, ...) -> dict`` function."""
        if self.evaluate is None:
            raise RecipeError(f"recipe {self.name!r} has no evaluation of checkpoints")
        return self._attr(self.evaluate)

    def compare_entry(self) -> tuple[type, Callable[[Any], dict[str, Any]]]:
        """The config dataclass and function of ``compare-gradients``."""
        if self.compare_gradients is None:
            supported = [r.name for r in RECIPES.values() if r.compare_gradients]
            raise RecipeError(
                f"recipe {self.name!r} has no compare-gradients; recipes that have one: "
                f"{', '.join(supported) or 'none'}"
            )
        module_name, cls_name, fn_name = self.compare_gradients.split(":")
        return self._attr(cls_name, module_name), self._attr(fn_name, module_name)


class RecipeError(LookupError):
    """An unknown recipe or a recipe that lacks the requested entry point."""


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` to the registry (replacing one of the same name)."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``.

    Raises:
        RecipeError: listing the registered recipes when ``name`` is unknown.
    """
    if name not in RECIPES:
        raise RecipeError(
            f"unknown recipe {name!r}; available recipes: {', '.join(RECIPES) or 'none'}"
        )
    return RECIPES[name]


register(
    Recipe(
        name="digits",
        summary="MDEQ-style convolutional DEQ classifier on scikit-learn's digits",
        module="equilibria.zoo.digits",
        config="DigitsConfig",
        train="train",
        evaluate="evaluate",
        compare_gradients="equilibria.zoo.compare:CompareConfig:compare_gradients",
        extras=("sklearn", "safetensors", "tqdm"),
        distributed=True,
        resumable=True,
    )
)
register(
    Recipe(
        name="mosaic",
        summary="segment digit mosaics: conv vs attention vs Hamburger (global context)",
        module="equilibria.zoo.mosaic",
        config="MosaicConfig",
        train="train",
        run_folder=False,
        extras=("sklearn",),
    )
)
