"""CMA-ES over [0, 1]^dim through pycma's ask/tell (``cma.CMAEvolutionStrategy``), one candidate at a time.

Defaults follow the evolutionary-model-merge paper (Akiba et al. 2024, arXiv:2403.13187): x0 from the
space (0.5 when none is given), sigma0 = 1/6, pycma's default popsize 4 + floor(3 ln n), bounds [0, 1]
(pycma's ``bounds`` option with its BoundTransform, so every candidate already lies in the cube).

Generations: the first ask of a generation calls ``es.ask()`` for the whole population; asks hand the
solutions out one by one and return None once all are out but not all told; the last tell of the
generation calls ``es.tell(solutions, [-scalar, ...])`` (pycma minimises, we maximise).

Failed candidates (``failed`` or a non-finite scalar) are told to pycma as the generation's worst finite
scalar minus (1 + the generation's spread of finite scalars), i.e. clearly worse than every real value
without distorting the ranking of the others. A generation in which everything failed is told as flat
(all 0): pycma then widens its step or stops.

Randomness: pycma draws its normals through the ``randn`` option, which we set to a module function that
reads from ``stream(seed, 'cmaes', generation)`` during ``es.ask()`` (and ``stream(seed, 'cmaes-tell',
generation)`` during ``es.tell()``). numpy's global RNG is never used or touched, and the pickled
``es`` (base64 inside the JSON state) holds no RNG state at all: a restored optimizer continues exactly.

Restarts: when pycma's termination criteria fire after a tell (``es.stop()``; e.g. tolfun, tolx, a flat
fitness) and ``restart`` is on, a fresh strategy starts again from x0 with sigma0 (same popsize).
"""

from __future__ import annotations

import base64
import math
import pickle
import threading
import warnings
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
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
    usable,
)
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation

_local = threading.local()


def _randn(*shape: int) -> np.ndarray:
    """pycma's ``randn`` option: standard normals from the stream of the current ask/tell."""
    gen = getattr(_local, "generator", None)
    if gen is None:
        raise RuntimeError("CMA-ES drew a random number outside a seeded ask/tell")
    return gen.standard_normal(size=shape)


@contextmanager
def _drawing_from(gen: np.random.Generator):
    previous = getattr(_local, "generator", None)
    _local.generator = gen
    try:
        yield
    finally:
        _local.generator = previous


def _import_cma():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Could not import matplotlib.pyplot" on headless machines
        import cma
    return cma


class CMAESSettings(OptimizerSettings):
    sigma0: float = Field(1 / 6, gt=0, le=1, description="initial step size (the cube has side 1)")
    popsize: int | None = Field(
        None, ge=2, description="candidates per generation; None: 4 + floor(3 ln dim)"
    )
    diagonal: bool = Field(False, description="separable CMA-ES (pycma's CMA_diagonal): for large dims")
    tolfun: float = Field(1e-11, ge=0, description="pycma's tolfun: stop when fitness changes stall")
    tolx: float = Field(1e-11, ge=0, description="pycma's tolx: stop when steps become this small")
    restart: bool = Field(True, description="start again from x0 when pycma's termination criteria fire")


class CMAES:
    """pycma's CMA-ES, maximising ``Evaluation.scalar``; asks wait (None) at generation boundaries."""

    name = "cmaes"
    generational = True
    Settings = CMAESSettings

    def __init__(
        self,
        settings: CMAESSettings | dict[str, Any] | None = None,
        *,
        dim: int,
        seed: int,
        x0: Sequence[float] | np.ndarray | None = None,
    ):
        self.settings: CMAESSettings = parse_settings(CMAESSettings, settings, self.name)
        self.dim = check_dim(dim)
        self.seed = int(seed)
        given = check_x0(x0, self.dim)
        self.x0 = np.full(self.dim, 0.5) if given is None else given
        self._next_id = 0
        self._generation = 0  # generations told so far, over all restarts
        self._restarts = 0
        self._solutions: list[list[float]] | None = None  # the current generation, once asked from pycma
        self._asked = 0
        self._slot: dict[int, int] = {}  # candidate id -> index in the generation (asked, not told)
        self._values: dict[int, float | None] = {}  # index -> scalar told (None: failed)
        self._best = BestTracker()
        self._es = self._new_es()
        self._es_at_ask: str | None = None

    def _new_es(self):
        cma = _import_cma()
        s = self.settings
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "randn": _randn,
            "seed": float("nan"),  # never touch numpy's global RNG
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "CMA_diagonal": s.diagonal,
            "tolfun": s.tolfun,
            "tolx": s.tolx,
        }
        if s.popsize is not None:
            opts["popsize"] = s.popsize
        with _drawing_from(stream(self.seed, "cmaes-init", self._restarts)):
            return cma.CMAEvolutionStrategy(self.x0.tolist(), s.sigma0, opts)

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    def ask(self) -> Candidate | None:
        if self._solutions is None:
            # pycma keys the solutions it hands out by Python's hash(), which differs between processes,
            # so a strategy pickled mid-generation cannot be told in another process. The state keeps the
            # strategy as it was before this ask; a restore repeats the (deterministic) ask.
            self._es_at_ask = _dump(self._es)
            self._solutions = self._ask_generation()
        if self._asked >= len(self._solutions):
            return None
        index = self._asked
        self._asked += 1
        cid = self._next_id
        self._next_id += 1
        self._slot[cid] = index
        info = {"generation": self._generation, "index": index, "restart": self._restarts}
        return Candidate(id=cid, genome=tuple(self._solutions[index]), info=info)

    def _ask_generation(self) -> list[list[float]]:
        with _drawing_from(stream(self.seed, "cmaes", self._generation)):
            population = self._es.ask()
        self._asked = 0
        self._values = {}
        return [list(genome_tuple(x)) for x in population]

    def tell(self, evaluation: Evaluation) -> None:
        index = self._slot.pop(evaluation.candidate_id, None)
        if index is None:
            raise unknown_candidate(evaluation.candidate_id)
        self._best.offer(evaluation)
        self._values[index] = float(evaluation.scalar) if usable(evaluation) else None
        assert self._solutions is not None
        if len(self._values) == len(self._solutions):
            self._finish_generation()

    def _finish_generation(self) -> None:
        assert self._solutions is not None
        values = [self._values[i] for i in range(len(self._solutions))]
        fitness = penalised(values)
        with _drawing_from(stream(self.seed, "cmaes-tell", self._generation)):
            self._es.tell([np.asarray(x, dtype=np.float64) for x in self._solutions], [-f for f in fitness])
        self._generation += 1
        self._solutions = None
        self._values = {}
        self._asked = 0
        if self.settings.restart and self._es.stop():
            self._restarts += 1
            self._es = self._new_es()

    def best(self) -> Evaluation | None:
        return self._best.best

    def _header(self) -> dict[str, Any]:
        return {**header(self.name, self.seed, self.dim, self.settings), "x0": self.x0.tolist()}

    def state(self) -> dict[str, Any]:
        blob = self._es_at_ask if self._solutions is not None else _dump(self._es)
        return {
            **self._header(),
            "next_id": self._next_id,
            "generation": self._generation,
            "restarts": self._restarts,
            "solutions": self._solutions,
            "asked": self._asked,
            "slots": [[cid, index] for cid, index in sorted(self._slot.items())],
            "values": [
                [index, None if v is None else num_out(v)] for index, v in sorted(self._values.items())
            ],
            "best": self._best.state(),
            "es": blob,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        check_header(state, self._header())
        _import_cma()
        self._es = pickle.loads(zlib.decompress(base64.b64decode(state["es"])))
        self._next_id = int(state["next_id"])
        self._generation = int(state["generation"])
        self._restarts = int(state["restarts"])
        sols = state["solutions"]
        self._solutions = None
        if sols is not None:  # mid-generation: the blob is the strategy before its ask; ask again
            self._es_at_ask = state["es"]
            again = self._ask_generation()
            if again != [[float(v) for v in x] for x in sols]:
                raise ValueError("restored CMA-ES state does not reproduce its generation (pycma version changed?)")
            self._solutions = again
        self._asked = int(state["asked"])
        self._slot = {int(cid): int(index) for cid, index in state["slots"]}
        self._values = {int(i): None if v is None else float(v) for i, v in state["values"]}
        self._best.load(state["best"])


def _dump(es) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(es, protocol=4))).decode("ascii")


def penalised(values: list[float | None]) -> list[float]:
    """Scalars for pycma with failures (None) replaced: worst finite minus (1 + spread); all failed: 0."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return [0.0] * len(values)
    worst, top = min(finite), max(finite)
    penalty = worst - (1.0 + (top - worst))
    return [v if v is not None and math.isfinite(v) else penalty for v in values]
