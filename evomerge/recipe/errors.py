"""Turn pydantic validation errors into messages that name the key, the file and what is allowed."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError

from evomerge.errors import RecipeError


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    current: typing.Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _inner_model(ann):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def explain(err: ValidationError, model: type[BaseModel], where: str) -> RecipeError:
    """One RecipeError listing every problem as 'where: key.path: message'."""
    from evomerge.recipe.values import VALUE_FORMS

    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if "parameters" in loc:
            # A parameter value failed every form of the union: one line, not one per form.
            cut = loc.index("parameters") + 2
            if len(loc) > cut:
                lines.append(f"{'.'.join(map(str, loc[:cut]))}: expected {VALUE_FORMS}")
                continue
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc)
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{path}: unknown key{hint}")
        else:
            lines.append(f"{path}: {e['msg']}")
    uniq = list(dict.fromkeys(lines))
    return RecipeError(f"{where}: invalid {model.__name__.lower()}:\n  " + "\n  ".join(uniq))
