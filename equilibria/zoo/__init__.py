"""Recipes: end-to-end training examples built on equilibria, and the ``equilibria`` CLI.

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
