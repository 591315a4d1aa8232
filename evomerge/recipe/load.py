"""Load a recipe file (evomerge YAML or a mergekit config) into a validated Recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import TypeAdapter, ValidationError

from evomerge.errors import RecipeError
from evomerge.kernels.registry import get_method
from evomerge.recipe.errors import explain
from evomerge.recipe.mergekit import from_mergekit
from evomerge.recipe.schema import Recipe
from evomerge.recipe.values import Conditional, Groups


def parse_recipe(data: object, where: str = "recipe") -> Recipe:
    """Validate a mapping (already parsed YAML) as a recipe; mergekit configs are recognised by 'merge_method'."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    if "merge_method" in data:
        data = from_mergekit(data, where)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise explain(e, Recipe, where) from None
    check_parameter_names(recipe, where)
    return recipe


def check_parameter_names(recipe: Recipe, where: str) -> None:
    """Every parameter key must belong to the method; per-model keys must be per-model parameters."""
    method = get_method(recipe.method)
    model_keys = set(method.model_params.model_fields)
    all_keys = model_keys | set(method.global_params.model_fields)
    groups = [("parameters", recipe.parameters, all_keys)]
    slices = recipe.slices or []
    for i, sl in enumerate(slices):
        groups.append((f"slices[{i}].parameters", sl.parameters, all_keys))
        for k, src in enumerate(sl.sources):
            groups.append((f"slices[{i}].sources[{k}].parameters", src.parameters, model_keys))
    for k, src in enumerate(recipe.sources or []):
        groups.append((f"sources[{k}].parameters", src.parameters, model_keys))
    fields = {**method.global_params.model_fields, **method.model_params.model_fields}
    for path, params, allowed in groups:
        for key, value in params.items():
            if key not in allowed:
                raise RecipeError(f"{where}: {path}: unknown parameter '{key}' for method '{method.name}' "
                                  f"(allowed: {', '.join(sorted(allowed)) or 'none'})")
            field = fields[key]
            adapter = TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
            for leaf in _leaves(value):
                try:
                    adapter.validate_python(leaf)
                except ValidationError as e:
                    msg = e.errors()[0]["msg"]
                    raise RecipeError(f"{where}: {path}.{key}: {leaf!r} is not accepted: {msg}") from None


def _leaves(value):
    """Every plain value inside a parameter value (gradient knots, groups, conditional values)."""
    if isinstance(value, Groups):
        yield from value.groups
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v.value if isinstance(v, Conditional) else v)
    else:
        yield value


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """The recipe in ``path`` and the directory its relative model paths are resolved against."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    return parse_recipe(data, str(p)), p.resolve().parent
