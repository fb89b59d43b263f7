"""Recipes: end-to-end training examples built on equilibria, the engine they share, and the
``equilibria`` CLI.

A recipe is a :class:`equilibria.zoo.task.Task` (config, data, model, loss, metrics); one trainer
(:mod:`equilibria.zoo.trainer`) trains every recipe and the sweep runner
(:mod:`equilibria.zoo.sweep`) tabulates variants x seeds.

Not imported by ``import equilibria``; the recipes may use the ``zoo`` extras (scikit-learn,
matplotlib, tqdm, safetensors), which are imported only where they are used.

Example:
    >>> from equilibria.zoo import get_recipe
    >>> recipe = get_recipe("digits")
    >>> config = recipe.config_class()(backward="implicit", epochs=5)
    >>> summary = recipe.train_function()(config)
"""

from .registry import RECIPES, Recipe, RecipeError, get_recipe, register

__all__ = ["RECIPES", "Recipe", "RecipeError", "get_recipe", "register"]
