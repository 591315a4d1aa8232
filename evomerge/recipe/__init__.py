"""Recipes: the YAML description of one merge (evomerge's own format or a mergekit config)."""

from evomerge.recipe.load import load_recipe, parse_recipe
from evomerge.recipe.schema import Recipe, Slice, Source

__all__ = ["Recipe", "Slice", "Source", "load_recipe", "parse_recipe"]
