"""Pieces every optimizer shares: strict settings, the state header, best-so-far tracking, genome checks.

State is plain JSON data (``json.dumps(state, allow_nan=False)`` works): numbers that may be infinite or
NaN are written as strings ("inf", "-inf", "nan") and read back with ``float``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import RecipeError
from evomerge.recipe.errors import explain
from evomerge.search.types import Evaluation

STATE_VERSION = 1


class OptimizerSettings(BaseModel):
    """Base of every optimizer's settings: strict (unknown keys are errors) and immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_settings(model: type[OptimizerSettings], settings: Any, optimizer: str) -> Any:
    """Validated settings from a mapping (or None, or an instance); a RecipeError names the bad key."""
    if isinstance(settings, model):
        return settings
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise RecipeError(
            f"optimizer '{optimizer}' settings must be a mapping, got {type(settings).__name__}"
        )
    try:
        return model.model_validate(settings)
    except ValidationError as e:
        raise explain(e, model, f"optimizer '{optimizer}' settings") from None


def check_dim(dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


def check_x0(x0: Sequence[float] | np.ndarray | None, dim: int) -> np.ndarray | None:
    """x0 as a float array of length dim inside [0, 1], or None."""
    if x0 is None:
        return None
    arr = np.asarray(x0, dtype=np.float64).reshape(-1)
    if arr.shape != (dim,):
        raise ValueError(f"x0 has {arr.size} entries, expected dim = {dim}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError("x0 must lie in [0, 1]^dim")
    return arr


def genome_tuple(x: Sequence[float] | np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1))


def num_out(x: float) -> float | str:
    """A float for JSON: finite values as numbers, others as 'inf' / '-inf' / 'nan'."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def evaluation_to_dict(ev: Evaluation) -> dict[str, Any]:
    return {
        "candidate_id": ev.candidate_id,
        "recipe_hash": ev.recipe_hash,
        "objectives": [num_out(v) for v in ev.objectives],
        "scalar": num_out(ev.scalar),
        "items": [num_out(v) for v in ev.items],
        "failed": ev.failed,
    }


def evaluation_from_dict(d: dict[str, Any]) -> Evaluation:
    return Evaluation(
        candidate_id=int(d["candidate_id"]),
        recipe_hash=str(d["recipe_hash"]),
        objectives=tuple(float(v) for v in d["objectives"]),
        scalar=float(d["scalar"]),
        items=tuple(float(v) for v in d["items"]),
        failed=bool(d["failed"]),
    )


def usable(ev: Evaluation) -> bool:
    """An evaluation that carries information: not failed and with a finite scalar."""
    return not ev.failed and math.isfinite(ev.scalar)


class BestTracker:
    """The told evaluation with the highest scalar; ties go to the lowest candidate id (so the answer does
    not depend on the order of tells). Failed or non-finite evaluations are never best."""

    def __init__(self) -> None:
        self.best: Evaluation | None = None

    def offer(self, ev: Evaluation) -> None:
        if not usable(ev):
            return
        b = self.best
        if b is None or ev.scalar > b.scalar or (ev.scalar == b.scalar and ev.candidate_id < b.candidate_id):
            self.best = ev

    def state(self) -> dict[str, Any] | None:
        return None if self.best is None else evaluation_to_dict(self.best)

    def load(self, data: dict[str, Any] | None) -> None:
        self.best = None if data is None else evaluation_from_dict(data)


def header(name: str, seed: int, dim: int | None, settings: OptimizerSettings) -> dict[str, Any]:
    """The identifying part of every state: which optimizer, seed, dimension and settings."""
    return {
        "optimizer": name,
        "version": STATE_VERSION,
        "seed": int(seed),
        "dim": dim,
        "settings": settings.model_dump(mode="json"),
    }


def check_header(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """A ValueError unless ``state`` was saved by an optimizer built like this one."""
    if not isinstance(state, dict):
        raise ValueError(f"optimizer state must be a mapping, got {type(state).__name__}")
    for key, want in expected.items():
        if state.get(key) != want:
            raise ValueError(
                f"optimizer state does not match this optimizer: '{key}' is {state.get(key)!r}, "
                f"expected {want!r} (build the optimizer with the run's original settings)"
            )


def unknown_candidate(candidate_id: int) -> ValueError:
    return ValueError(f"candidate {candidate_id} was not asked by this optimizer or was already told")
