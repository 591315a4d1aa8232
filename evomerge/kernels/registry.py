"""The one registry of merge methods.

A merge kernel is a pure function of float32 tensors and frozen parameter models::

    fn(xs, base, model_params, global_params, ctx) -> Tensor

``xs`` are the source tensors (one per model, already float32 on the compute device and owned by the
kernel, which may modify them in place), ``base`` the base model's tensor or None, ``model_params`` one
validated per-model parameter object per source, ``global_params`` the validated global parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from evomerge.errors import RecipeError
from evomerge.kernels.params import MethodParams, NoParams


@dataclass(frozen=True)
class TensorContext:
    """What a kernel may know about the tensor it merges."""

    name: str
    layer: int | None = None
    num_layers: int = 1
    component: str = "other"
    seed: int = 0
    model_ids: tuple[str, ...] = ()

    @property
    def depth(self) -> float | None:
        """Relative depth in [0, 1] of this tensor's layer (None outside the layer stack)."""
        if self.layer is None:
            return None
        return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 0.0


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its kernel, parameter models and requirements."""

    name: str
    fn: Callable
    model_params: type[MethodParams]
    global_params: type[MethodParams]
    base: Literal["required", "none"]
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    paper: str = ""
    summary: str = ""
    elementwise: bool = False  # output entry i depends only on input entries i: safe to run in chunks

    def check_models(self, n_sources: int, has_base: bool) -> None:
        """Raise RecipeError if this method cannot merge ``n_sources`` models (with/without a base)."""
        if self.base == "required" and not has_base:
            raise RecipeError(f"method '{self.name}' needs a base model: set 'base' in the recipe")
        if n_sources < self.min_models:
            raise RecipeError(f"method '{self.name}' needs at least {self.min_models} source models, got {n_sources}")
        if self.max_models is not None and n_sources > self.max_models:
            raise RecipeError(f"method '{self.name}' takes at most {self.max_models} source models, got {n_sources}")


_REGISTRY: dict[str, MergeMethod] = {}


def register(name: str, *, model_params: type[MethodParams] = NoParams,
             global_params: type[MethodParams] = NoParams, base: Literal["required", "none"] = "required",
             min_models: int = 1, max_models: int | None = None, randomized: bool = False, paper: str = "",
             summary: str = "", elementwise: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as merge method ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise RuntimeError(f"merge method '{name}' registered twice")
        _REGISTRY[name] = MergeMethod(name, fn, model_params, global_params, base, min_models, max_models,
                                      randomized, paper, summary, elementwise)
        return fn

    return deco


def _load_all() -> None:
    # Importing the method modules runs their @register decorators.
    from evomerge.kernels import geometric, taskvector  # noqa: F401


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; an unknown name lists the known ones."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown merge method '{name}'; known methods: {', '.join(sorted(_REGISTRY))}") from None


def methods() -> dict[str, MergeMethod]:
    """All registered methods by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))
