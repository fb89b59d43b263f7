"""The recipe registry: recipe name -> its :class:`~equilibria.zoo.task.Task` class.

Entries name their module and class as strings and are imported only when used, so listing the
recipes (``equilibria --help``) stays fast and one broken recipe does not break the others.

A recipe module provides a :class:`~equilibria.zoo.task.Task` subclass (its config dataclass,
data, model, loss and metrics); training, evaluation, reports and sweeps are the engine's
(:mod:`equilibria.zoo.trainer`, :mod:`equilibria.zoo.evaluation`, :mod:`equilibria.zoo.sweep`).
Register a new one with :func:`register`.
"""

from __future__ import annotations

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
        task: name of its :class:`~equilibria.zoo.task.Task` subclass in ``module``.
        compare_gradients: where its gradient comparison lives, as
            ``"module:ConfigClass:function"``, if it has one.
    """

    name: str
    summary: str
    module: str
    task: str
    compare_gradients: str | None = None

    def _attr(self, name: str, module_name: str | None = None) -> Any:
        module_name = self.module if module_name is None else module_name
        module = importlib.import_module(module_name)
        try:
            return getattr(module, name)
        except AttributeError:
            raise RecipeError(
                f"recipe {self.name!r}: module {module_name} has no attribute {name!r}"
            ) from None

    def task_class(self) -> Any:
        """The Task subclass (imports the recipe module)."""
        from .task import Task

        cls = self._attr(self.task)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise RecipeError(f"recipe {self.name!r}: {self.module}.{self.task} is no Task")
        return cls

    def config_class(self) -> type:
        """The config dataclass (imports the recipe module)."""
        return self.task_class().config_class

    def train_function(self) -> Callable[..., dict[str, Any]]:
        """``train(config, on_epoch_end=None) -> summary`` on the one trainer."""
        from .trainer import train

        task_cls = self.task_class()

        def run(config: Any, **kwargs: Any) -> dict[str, Any]:
            return train(task_cls(config), **kwargs)

        return run

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
        task="DigitsTask",
        compare_gradients="equilibria.zoo.compare:CompareConfig:compare_gradients",
    )
)
register(
    Recipe(
        name="mosaic",
        summary="segment digit mosaics: conv vs attention vs Hamburger (global context)",
        module="equilibria.zoo.mosaic",
        task="MosaicTask",
    )
)
register(
    Recipe(
        name="diffusion",
        summary="epsilon-MLP on digits; DDIM sampled sequentially and as one parallel fixed point",
        module="equilibria.zoo.diffusion",
        task="DiffusionTask",
    )
)
register(
    Recipe(
        name="colorize",
        summary="reference-based line-art colorization: SCFT attention vs stop-gradient attention",
        module="equilibria.zoo.colorize",
        task="ColorizeTask",
    )
)
register(
    Recipe(
        name="flow",
        summary="optical flow on generated pairs: DEQ-Flow (equilibrium) vs unrolled RAFT",
        module="equilibria.zoo.flow",
        task="FlowTask",
    )
)
register(
    Recipe(
        name="prelax",
        summary="self-supervised digits: SimSiam vs SimSiam + rotation vs Prelax (linear probe)",
        module="equilibria.zoo.prelax",
        task="PrelaxTask",
    )
)
register(
    Recipe(
        name="denoise",
        summary="equilibrium image denoiser vs DnCNN-style CNN vs unrolled (scikit-image images)",
        module="equilibria.zoo.denoise",
        task="DenoiseTask",
    )
)
