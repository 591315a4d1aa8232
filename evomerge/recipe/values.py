"""Parameter values that vary over depth and by tensor, and how they resolve for one tensor.

A value is one of
  * a scalar (``0.5``, ``true``);
  * a gradient: a list of numbers spread evenly over depth t in [0, 1], linearly interpolated;
  * layer groups: ``{groups: [v0, v1, ...]}``, piecewise constant: layer l of L takes group floor(l*G/L);
  * conditionals: ``[{filter: attention, value: 0.3}, {value: 0.7}]``, first match wins; a filter is a
    component name (embedding, attention, mlp, norm, head, other) or a substring of the tensor name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

from evomerge.checkpoint.naming import COMPONENTS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Groups(_Strict):
    groups: list[float] = Field(min_length=1)


Plain = Union[bool, float, str, list[float], Groups]  # noqa: UP007 - pydantic smart union order


class Conditional(_Strict):
    filter: str | None = None
    value: Plain


ParamValue = Union[bool, float, str, list[float], Groups, list[Conditional]]  # noqa: UP007
VALUE_FORMS = "a number, true/false, a name, a list of numbers (gradient), {groups: [...]} or a list of {filter, value}"


@dataclass(frozen=True)
class Where:
    """Where a tensor sits, as parameter resolution needs it."""

    name: str  # the tensor name filters are matched against
    component: str
    t: float  # relative depth inside its slice, in [0, 1]
    layer: int | None  # layer offset inside its slice (None outside the layer stack)
    num_layers: int  # layers in the slice


def _plain(value, where: Where) -> float | bool | str:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Groups):
        g = len(value.groups)
        if where.layer is None:
            return float(value.groups[0] if where.t <= 0 else value.groups[-1])
        return float(value.groups[min(g - 1, where.layer * g // max(1, where.num_layers))])
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list is not a parameter value")
        if len(value) == 1:
            return float(value[0])
        s = where.t * (len(value) - 1)
        i0 = min(len(value) - 1, math.floor(s))
        i1 = min(len(value) - 1, i0 + 1)
        f = s - i0
        return float((1 - f) * value[i0] + f * value[i1])
    raise TypeError(f"cannot read parameter value {value!r}")


def matches(filter_: str | None, where: Where, substring_only: bool) -> bool:
    if filter_ is None or filter_ == "*":
        return True
    if not substring_only and filter_ in COMPONENTS:
        return where.component == filter_
    return filter_ in where.name


def resolve(value: ParamValue, where: Where, *, substring_only: bool = False) -> float | bool | str | None:
    """The value for one tensor, or None if a conditional list has no matching entry."""
    if isinstance(value, list) and value and isinstance(value[0], Conditional):
        for cond in value:
            if matches(cond.filter, where, substring_only):
                return _plain(cond.value, where)
        return None
    return _plain(value, where)
