"""Turn a pydantic ValidationError on a task config into one TaskError naming the file and each key."""

from __future__ import annotations

import typing

from pydantic import BaseModel, ValidationError

from evomerge.errors import TaskError


def explain(err: ValidationError, model: type[BaseModel], where: str) -> TaskError:
    """One TaskError listing each problem as 'where: key.path: message', unknown keys with the allowed ones."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        path, allowed, at = _walk(model, tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif e["type"] == "union_tag_not_found":
            key = e.get("ctx", {}).get("discriminator", "'type'")
            tags = [t for t in map(_tag, at) if t] if isinstance(at, list) else []
            msg = f"missing {key}" + (f" (allowed: {', '.join(tags)})" if tags else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
        problems.setdefault(path, [])
        if msg not in problems[path]:
            problems[path].append(msg)
    lines = [f"{where}: {path}: {'; or '.join(msgs)}" for path, msgs in problems.items()]
    return TaskError("\n".join(lines))


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, list[str], object]:
    """Display path for a pydantic error location (union member tags dropped), the keys allowed at the
    last model on the way, and what the location points at (a model, a list of union members, None)."""
    shown: list[str] = []
    allowed: list[str] = []
    current: object = model
    for part in loc:
        if isinstance(part, int):
            shown.append(f"[{part}]")
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            allowed = list(current.model_fields)
            shown.append(part)
            info = current.model_fields.get(part)
            current = _models_in(info.annotation) if info is not None else None
        elif isinstance(current, list):  # a union of models: this part is the member's tag
            current = next((m for m in current if _tag(m) == part or m.__name__ == part), None)
    path = "".join(p if p.startswith("[") else f".{p}" for p in shown).lstrip(".")
    return path or "(top level)", allowed, current


def _models_in(annotation) -> object:
    models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if not models:
        return None
    return models[0] if len(models) == 1 else models


def _flatten(annotation):
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [leaf for arg in args for leaf in _flatten(arg)]


def _tag(model: type[BaseModel]) -> str | None:
    info = model.model_fields.get("type")
    args = typing.get_args(info.annotation) if info is not None else ()
    return args[0] if args else None
