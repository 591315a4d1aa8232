"""The optimizers, one registry keyed by name, and ``make_optimizer`` that builds one from a config.

=========  =====================================================================  ==================
name       what                                                                   waits (ask -> None)
=========  =====================================================================  ==================
random     uniform genomes in [0, 1]^dim, the baseline                            never
cmaes      pycma's CMA-ES (Hansen), defaults of Akiba et al. 2024                 between generations
m2n2       natural-niche competition + attraction (Abrantes et al. 2025)          model mode: until 2
                                                                                  members are told
nsga2      NSGA-II (Deb et al. 2002) on the objectives                            between generations
=========  =====================================================================  ==================

Each class has a ``name``, a pydantic ``Settings`` model (strict: an unknown key or an out-of-range value is
a RecipeError naming the key) and implements ``evomerge.search.types.Optimizer``.
``import evomerge.search.optimizers`` does not import pycma: the cmaes module imports it when first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evomerge.errors import RecipeError
from evomerge.search.optimizers.cmaes import CMAES
from evomerge.search.optimizers.m2n2 import M2N2
from evomerge.search.optimizers.nsga2 import NSGA2
from evomerge.search.optimizers.random_search import RandomSearch
from evomerge.search.types import Optimizer, SearchSpace

OPTIMIZERS: dict[str, type] = {cls.name: cls for cls in (RandomSearch, CMAES, M2N2, NSGA2)}
"""Optimizer name -> class."""


def optimizer_class(name: str) -> type:
    """The optimizer class registered as ``name``; a RecipeError lists the known names."""
    if name not in OPTIMIZERS:
        raise RecipeError(f"optimizer.name: unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name]


def settings_model(name: str) -> type:
    """The pydantic settings model of optimizer ``name`` (for docs and early validation)."""
    return optimizer_class(name).Settings


def make_optimizer(
    name: str,
    settings: dict[str, Any] | None = None,
    *,
    seed: int,
    space: SearchSpace | None = None,
    dim: int | None = None,
    x0: Sequence[float] | np.ndarray | None = None,
    n_objectives: int | None = None,
    **model_space: Any,
) -> Optimizer:
    """Build optimizer ``name`` with validated ``settings``.

    Genome optimizers take ``dim`` and ``x0`` from ``space`` (``space.dim``, ``space.x0()``) unless given
    explicitly. ``n_objectives`` (tasks, plus one for a cost) lets NSGA-II check every evaluation; the
    single-objective optimizers do not need it. ``model_space`` carries M2N2's model-space arguments
    (``initial``, ``make_child``, ``num_layers``); other optimizers reject them with a TypeError.
    """
    cls = optimizer_class(name)
    if space is not None:
        dim = space.dim if dim is None else dim
        x0 = space.x0() if x0 is None else x0
    if name == "m2n2":
        return cls(settings, seed=seed, dim=dim, x0=x0, **model_space)
    if model_space:
        raise TypeError(
            f"optimizer '{name}' takes no {', '.join(sorted(model_space))} (model space is m2n2's)"
        )
    if dim is None:
        raise ValueError(f"optimizer '{name}' needs a search space (or dim)")
    if name == "nsga2":
        return cls(settings, seed=seed, dim=dim, x0=x0, n_objectives=n_objectives)
    return cls(settings, seed=seed, dim=dim, x0=x0)


__all__ = [
    "CMAES",
    "M2N2",
    "NSGA2",
    "OPTIMIZERS",
    "RandomSearch",
    "make_optimizer",
    "optimizer_class",
    "settings_model",
]
