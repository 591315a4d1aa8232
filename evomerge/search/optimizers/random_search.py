"""Random search: genomes drawn uniformly from [0, 1]^dim, the baseline every other optimizer must beat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from evomerge.search.optimizers.base import (
    BestTracker,
    OptimizerSettings,
    check_dim,
    check_header,
    check_x0,
    genome_tuple,
    header,
    parse_settings,
    unknown_candidate,
)
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation


class RandomSearchSettings(OptimizerSettings):
    start_at_x0: bool = Field(True, description="the first candidate is the space's x0 (when one is given)")


class RandomSearch:
    """Uniform random genomes; candidate i is drawn from ``stream(seed, 'random', i)``. Never waits."""

    name = "random"
    generational = False
    Settings = RandomSearchSettings

    def __init__(
        self,
        settings: RandomSearchSettings | dict[str, Any] | None = None,
        *,
        dim: int,
        seed: int,
        x0: Sequence[float] | np.ndarray | None = None,
    ):
        self.settings: RandomSearchSettings = parse_settings(RandomSearchSettings, settings, self.name)
        self.dim = check_dim(dim)
        self.seed = int(seed)
        self.x0 = check_x0(x0, self.dim)
        self._next_id = 0
        self._pending: set[int] = set()
        self._best = BestTracker()

    def ask(self) -> Candidate:
        cid = self._next_id
        self._next_id += 1
        if cid == 0 and self.settings.start_at_x0 and self.x0 is not None:
            genome = self.x0
        else:
            genome = stream(self.seed, "random", cid).random(self.dim)
        self._pending.add(cid)
        return Candidate(id=cid, genome=genome_tuple(genome))

    def tell(self, evaluation: Evaluation) -> None:
        if evaluation.candidate_id not in self._pending:
            raise unknown_candidate(evaluation.candidate_id)
        self._pending.discard(evaluation.candidate_id)
        self._best.offer(evaluation)

    def best(self) -> Evaluation | None:
        return self._best.best

    def _header(self) -> dict[str, Any]:
        return header(self.name, self.seed, self.dim, self.settings)

    def state(self) -> dict[str, Any]:
        return {
            **self._header(),
            "next_id": self._next_id,
            "pending": sorted(self._pending),
            "best": self._best.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        check_header(state, self._header())
        self._next_id = int(state["next_id"])
        self._pending = {int(i) for i in state["pending"]}
        self._best.load(state["best"])
