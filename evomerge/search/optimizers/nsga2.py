"""NSGA-II over [0, 1]^dim, maximising every entry of ``Evaluation.objectives`` (Deb et al. 2002).

Generation-based like CMA-ES: generation 0 is ``popsize`` uniform random genomes (the first is x0 when
given and ``start_at_x0``); every later generation is ``popsize`` offspring of the current population.
Asks hand a generation out one candidate at a time and return None once all are out but not all told.
When the last one is told, parents and offspring are merged and the next population is chosen by
non-dominated sorting, filling with whole fronts and cutting the last one by crowding distance (largest
first; ties keep the earlier entry, parents before offspring).

Variation, all in the cube [0, 1]:
* binary tournament: lower front rank wins, then larger crowding distance, then a coin flip (rank and
  crowding are computed over the current population);
* SBX crossover (Deb & Agrawal 1995, bounded form of Deb's NSGA-II code), applied to a pair with
  probability ``crossover_prob``, then to each gene with probability 0.5, distribution index
  ``eta_crossover`` (default 15); the two children are swapped gene-wise with probability 0.5;
* polynomial mutation (bounded form), each gene with probability ``mutation_prob`` (default 1 / dim),
  distribution index ``eta_mutation`` (default 20).

Failed candidates (``failed`` or a non-finite objective) take, at survival time, objectives one below the
pool's minimum of every objective over usable members: every usable member dominates them. All random
draws of generation g come from ``stream(seed, 'nsga2', g)``.
"""

from __future__ import annotations

import math
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
    num_out,
    parse_settings,
    unknown_candidate,
)
from evomerge.search.pareto import nondominated_fronts
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation


class NSGA2Settings(OptimizerSettings):
    popsize: int = Field(20, ge=4, description="population size N (offspring per generation)")
    crossover_prob: float = Field(0.9, ge=0, le=1, description="probability that a pair is recombined")
    eta_crossover: float = Field(15.0, gt=0, description="SBX distribution index (larger: children nearer)")
    mutation_prob: float | None = Field(None, ge=0, le=1, description="per gene; None: 1 / dim")
    eta_mutation: float = Field(20.0, gt=0, description="polynomial mutation distribution index")
    start_at_x0: bool = Field(True, description="the first genome of generation 0 is the space's x0")


def crowding_distance(objectives: np.ndarray) -> np.ndarray:
    """Crowding distance of each point of one front: boundary points inf, others the sum over objectives
    of the normalised gap between their two neighbours."""
    pts = np.asarray(objectives, dtype=np.float64)
    n, d = pts.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(d):
        order = np.argsort(pts[:, k], kind="stable")
        col = pts[order, k]
        dist[order[0]] = dist[order[-1]] = np.inf
        span = col[-1] - col[0]
        if span > 0:
            dist[order[1:-1]] += (col[2:] - col[:-2]) / span
    return dist


def rank_and_crowding(objectives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Front rank (0 = non-dominated) and crowding distance within the front, for every point."""
    n = len(objectives)
    rank = np.zeros(n, dtype=np.int64)
    crowd = np.zeros(n)
    for r, front in enumerate(nondominated_fronts(objectives)):
        rank[front] = r
        crowd[front] = crowding_distance(objectives[front])
    return rank, crowd


def survivors(objectives: np.ndarray, n: int) -> list[int]:
    """Indices of the n survivors: whole fronts, the last cut by crowding distance (stable, largest first)."""
    chosen: list[int] = []
    for front in nondominated_fronts(objectives):
        if len(chosen) + len(front) <= n:
            chosen.extend(front)
        else:
            crowd = crowding_distance(objectives[front])
            order = np.argsort(-crowd, kind="stable")
            chosen.extend(front[i] for i in order[: n - len(chosen)])
        if len(chosen) == n:
            break
    return chosen


def effective_objectives(objectives: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """Objectives with failed rows set one below the usable minimum (all zeros if none is usable)."""
    out = np.array(objectives, dtype=np.float64)
    good = ~failed
    if not good.any():
        return np.zeros_like(out)
    out[failed] = out[good].min(axis=0) - 1.0
    return out


def sbx(rng: np.random.Generator, p1: np.ndarray, p2: np.ndarray, eta: float, prob: float):
    """Bounded simulated binary crossover in [0, 1]; returns two children."""
    c1, c2 = p1.copy(), p2.copy()
    if rng.random() > prob:
        return c1, c2
    d = len(p1)
    u, pick, swap = rng.random(d), rng.random(d), rng.random(d)
    for i in range(d):
        if pick[i] > 0.5 or abs(p1[i] - p2[i]) <= 1e-14:
            continue
        y1, y2 = min(p1[i], p2[i]), max(p1[i], p2[i])
        gap = y2 - y1

        def betaq(beta: float, ui: float = u[i]) -> float:
            alpha = 2.0 - beta ** -(eta + 1.0)
            if ui <= 1.0 / alpha:
                return (ui * alpha) ** (1.0 / (eta + 1.0))
            return (1.0 / (2.0 - ui * alpha)) ** (1.0 / (eta + 1.0))

        lo = 0.5 * ((y1 + y2) - betaq(1.0 + 2.0 * y1 / gap) * gap)
        hi = 0.5 * ((y1 + y2) + betaq(1.0 + 2.0 * (1.0 - y2) / gap) * gap)
        lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
        c1[i], c2[i] = (hi, lo) if swap[i] <= 0.5 else (lo, hi)
    return c1, c2


def polynomial_mutation(rng: np.random.Generator, x: np.ndarray, eta: float, prob: float) -> np.ndarray:
    """Bounded polynomial mutation in [0, 1], each gene with probability ``prob``."""
    y = x.copy()
    d = len(x)
    hit, u = rng.random(d) < prob, rng.random(d)
    power = 1.0 / (eta + 1.0)
    for i in np.flatnonzero(hit):
        if u[i] < 0.5:
            val = 2.0 * u[i] + (1.0 - 2.0 * u[i]) * (1.0 - y[i]) ** (eta + 1.0)
            delta = val**power - 1.0
        else:
            val = 2.0 * (1.0 - u[i]) + 2.0 * (u[i] - 0.5) * y[i] ** (eta + 1.0)
            delta = 1.0 - val**power
        y[i] = min(max(y[i] + delta, 0.0), 1.0)
    return y


class NSGA2:
    """NSGA-II with SBX and polynomial mutation; see the module docstring."""

    name = "nsga2"
    generational = True
    Settings = NSGA2Settings

    def __init__(
        self,
        settings: NSGA2Settings | dict[str, Any] | None = None,
        *,
        dim: int,
        seed: int,
        x0: Sequence[float] | np.ndarray | None = None,
        n_objectives: int | None = None,
    ):
        self.settings: NSGA2Settings = parse_settings(NSGA2Settings, settings, self.name)
        self.dim = check_dim(dim)
        self.seed = int(seed)
        self.x0 = check_x0(x0, self.dim)
        if n_objectives is not None and (isinstance(n_objectives, bool) or int(n_objectives) < 1):
            raise ValueError(f"n_objectives must be a positive integer, got {n_objectives!r}")
        self.n_objectives = None if n_objectives is None else int(n_objectives)
        self._next_id = 0
        self._generation = 0
        self._offspring: list[list[float]] | None = None
        self._asked = 0
        self._slot: dict[int, int] = {}
        self._told: dict[int, dict[str, Any]] = {}  # index in the generation -> member record
        self._population: list[dict[str, Any]] = []  # each: id, genome, objectives, failed
        self._best = BestTracker()

    def _make_offspring(self) -> list[list[float]]:
        rng = stream(self.seed, "nsga2", self._generation)
        s, n = self.settings, self.settings.popsize
        if not self._population:
            out = [list(genome_tuple(rng.random(self.dim))) for _ in range(n)]
            if s.start_at_x0 and self.x0 is not None and self._generation == 0:
                out[0] = list(genome_tuple(self.x0))
            return out
        genomes = np.array([m["genome"] for m in self._population], dtype=np.float64)
        rank, crowd = rank_and_crowding(self._objectives(self._population))
        pm = s.mutation_prob if s.mutation_prob is not None else 1.0 / self.dim

        def tournament() -> int:
            i, j = rng.choice(len(genomes), size=2, replace=False)
            if rank[i] != rank[j]:
                return int(i if rank[i] < rank[j] else j)
            if crowd[i] != crowd[j]:
                return int(i if crowd[i] > crowd[j] else j)
            return int(i if rng.random() < 0.5 else j)

        out: list[list[float]] = []
        while len(out) < n:
            a, b = tournament(), tournament()
            for child in sbx(rng, genomes[a], genomes[b], s.eta_crossover, s.crossover_prob):
                out.append(list(genome_tuple(polynomial_mutation(rng, child, s.eta_mutation, pm))))
        return out[:n]

    @staticmethod
    def _objectives(members: list[dict[str, Any]]) -> np.ndarray:
        objs = np.array([m["objectives"] for m in members], dtype=np.float64)
        failed = np.array([m["failed"] for m in members], dtype=bool)
        return effective_objectives(objs, failed)

    def ask(self) -> Candidate | None:
        if self._offspring is None:
            self._offspring = self._make_offspring()
            self._asked = 0
            self._told = {}
        if self._asked >= len(self._offspring):
            return None
        index = self._asked
        self._asked += 1
        cid = self._next_id
        self._next_id += 1
        self._slot[cid] = index
        info = {"generation": self._generation, "index": index}
        return Candidate(id=cid, genome=tuple(self._offspring[index]), info=info)

    def tell(self, evaluation: Evaluation) -> None:
        index = self._slot.get(evaluation.candidate_id)
        if index is None:
            raise unknown_candidate(evaluation.candidate_id)
        objs = [float(v) for v in evaluation.objectives]
        if not objs:
            raise ValueError(f"candidate {evaluation.candidate_id}: nsga2 needs at least one objective")
        known = self._population or list(self._told.values())
        want = self.n_objectives or (len(known[0]["objectives"]) if known else len(objs))
        if len(objs) != want:
            raise ValueError(f"candidate {evaluation.candidate_id}: {len(objs)} objectives, expected {want}")
        failed = evaluation.failed or not all(math.isfinite(v) for v in objs)
        del self._slot[evaluation.candidate_id]
        self._best.offer(evaluation)
        assert self._offspring is not None
        self._told[index] = {
            "id": evaluation.candidate_id,
            "genome": self._offspring[index],
            "objectives": [0.0] * len(objs) if failed else objs,
            "failed": failed,
        }
        if len(self._told) == len(self._offspring):
            pool = self._population + [self._told[i] for i in range(len(self._offspring))]
            keep = survivors(self._objectives(pool), self.settings.popsize)
            self._population = [pool[i] for i in sorted(keep)]
            self._generation += 1
            self._offspring = None
            self._told = {}
            self._asked = 0

    def best(self) -> Evaluation | None:
        return self._best.best

    def population(self) -> list[dict[str, Any]]:
        """The current population (id, genome, objectives, failed), in pool order."""
        return [dict(m) for m in self._population]

    def _header(self) -> dict[str, Any]:
        x0 = None if self.x0 is None else self.x0.tolist()
        return {
            **header(self.name, self.seed, self.dim, self.settings),
            "x0": x0,
            "n_objectives": self.n_objectives,
        }

    def state(self) -> dict[str, Any]:
        def rec(m: dict[str, Any]) -> dict[str, Any]:
            return {**m, "objectives": [num_out(v) for v in m["objectives"]]}

        return {
            **self._header(),
            "next_id": self._next_id,
            "generation": self._generation,
            "offspring": self._offspring,
            "asked": self._asked,
            "slots": [[cid, index] for cid, index in sorted(self._slot.items())],
            "told": [[index, rec(m)] for index, m in sorted(self._told.items())],
            "population": [rec(m) for m in self._population],
            "best": self._best.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        check_header(state, self._header())

        def rec(m: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": int(m["id"]),
                "genome": [float(v) for v in m["genome"]],
                "objectives": [float(v) for v in m["objectives"]],
                "failed": bool(m["failed"]),
            }

        self._next_id = int(state["next_id"])
        self._generation = int(state["generation"])
        off = state["offspring"]
        self._offspring = None if off is None else [[float(v) for v in x] for x in off]
        self._asked = int(state["asked"])
        self._slot = {int(cid): int(index) for cid, index in state["slots"]}
        self._told = {int(index): rec(m) for index, m in state["told"]}
        self._population = [rec(m) for m in state["population"]]
        self._best.load(state["best"])
