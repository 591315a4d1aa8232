"""The seams of a search: what a candidate is, what an evaluation tells an optimizer, and the two
interfaces (SearchSpace, Optimizer) the run loop drives.

A search space maps a genome (a point of the unit cube [0, 1]^dim) to a merge Recipe and back. An
optimizer proposes candidates (``ask``) and learns from their evaluations (``tell``); it never calls
fitness code, so the in-process loop, Ray workers, replay on resume and tests all drive it the same way.
Every random draw of an optimizer derives from (run seed, counter) through ``evomerge.search.rng``, so
its state is plain data (``state`` / ``load_state``) with no hidden RNG to lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from evomerge.recipe.schema import Recipe

CANDIDATE_PREFIX = "candidate:"  # a Source.model of this form names an earlier candidate by recipe hash


def candidate_ref(recipe_hash: str) -> str:
    """The Source.model string naming an earlier candidate (lineage recipes)."""
    return CANDIDATE_PREFIX + recipe_hash


@dataclass(frozen=True)
class Candidate:
    """One proposal of an optimizer.

    ``id`` is the optimizer's ask counter (0, 1, 2, ...), unique within a run. Recipe-space optimizers
    fill ``genome`` (the run decodes it with the search space); model-space optimizers (M2N2 over models)
    fill ``recipe`` directly, whose sources may name earlier candidates (``candidate:<hash>``).
    ``parents`` are recipe hashes; ``info`` is JSON-able bookkeeping (generation, split point, mix...).
    """

    id: int
    genome: tuple[float, ...] | None = None
    recipe: Recipe | None = None
    parents: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if (self.genome is None) == (self.recipe is None):
            raise ValueError("a Candidate has exactly one of 'genome' or 'recipe'")


@dataclass(frozen=True)
class Evaluation:
    """What an optimizer learns about a candidate (search split only; held-out never reaches it).

    ``objectives``: one mean score per task, in the config's task order, higher is better (a cost
    objective, if configured, comes last and is negated so that higher is still better).
    ``scalar``: the weighted sum single-objective optimizers maximise.
    ``items``: per-item scores of every task's search split, concatenated in task order, each in [0, 1]
    (M2N2's resource competition). ``failed``: the candidate could not be evaluated; then objectives and
    items are all zeros and scalar is -inf.
    """

    candidate_id: int
    recipe_hash: str
    objectives: tuple[float, ...]
    scalar: float
    items: tuple[float, ...]
    failed: bool = False

    def items_array(self) -> np.ndarray:
        return np.asarray(self.items, dtype=np.float64)


@runtime_checkable
class SearchSpace(Protocol):
    """Genome <-> recipe. Genomes live in [0, 1]^dim; decode clips values outside."""

    @property
    def dim(self) -> int: ...

    def gene_names(self) -> list[str]: ...

    def x0(self) -> np.ndarray:
        """The starting genome (CMA-ES mean, random-search centre)."""
        ...

    def decode(self, genome: Sequence[float]) -> Recipe: ...

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe this space can express; RecipeError if it cannot."""
        ...

    def cost(self, genome: Sequence[float]) -> float | None:
        """An optional cost objective (e.g. layers of a data-flow path); None if the space has none."""
        ...


@runtime_checkable
class Optimizer(Protocol):
    """Ask/tell, keyed by candidate id; state is JSON-able data."""

    name: str
    generational: bool
    """True when asks wait for whole generations (CMA-ES, NSGA-II); False when an ask never waits long
    (random, M2N2). Evaluators may then be sent work ahead without idling at a generation's end."""

    def ask(self) -> Candidate | None:
        """The next candidate, or None when the optimizer must first hear about candidates in flight
        (e.g. CMA-ES between generations)."""
        ...

    def tell(self, evaluation: Evaluation) -> None:
        """The result of an earlier ask, in any order."""
        ...

    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly (JSON-able: numbers, strings, lists, dicts)."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def best(self) -> Evaluation | None:
        """The best evaluation told so far by the optimizer's own criterion."""
        ...
