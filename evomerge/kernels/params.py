"""Typed, bounded merge parameters.

Every merge method declares two frozen pydantic models: per-model parameters (e.g. ``weight``,
``density``) and global parameters (e.g. ``lam``, ``normalize``). Their field bounds are the validation
bounds; ``search`` metadata gives the default range a search explores. Search spaces derive genome
layouts from these fields, so there is no side table of parameters anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    """Base for a method's parameter model: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoParams(MethodParams):
    """A method (or scope) without parameters."""


def param(default: Any, ge: float | None = None, le: float | None = None, *, search: tuple | None = None,
          doc: str = "", gt: float | None = None) -> Any:
    """A bounded field; ``search`` is the (low, high) range a search explores by default."""
    extra = {"search": list(search)} if search is not None else None
    return Field(default, ge=ge, le=le, gt=gt, description=doc, json_schema_extra=extra)


@dataclass(frozen=True)
class ParamInfo:
    """One field of a parameter model as a search space sees it."""

    name: str
    kind: str  # "float" | "int" | "bool"
    default: Any
    low: float | None
    high: float | None
    search: tuple[float, float] | None
    doc: str


def describe(model: type[MethodParams]) -> list[ParamInfo]:
    """The fields of a parameter model with their bounds (used for genomes and for `evomerge methods`)."""
    out = []
    for name, field in model.model_fields.items():
        low = high = None
        for meta in field.metadata:
            for attr in ("ge", "gt"):
                if getattr(meta, attr, None) is not None:
                    low = float(getattr(meta, attr))
            for attr in ("le", "lt"):
                if getattr(meta, attr, None) is not None:
                    high = float(getattr(meta, attr))
        ann = field.annotation
        kind = "bool" if ann is bool else "int" if ann is int else "float"
        extra = field.json_schema_extra or {}
        search = tuple(extra["search"]) if isinstance(extra, dict) and "search" in extra else None
        out.append(ParamInfo(name, kind, field.default, low, high, search, field.description or ""))
    return out
