"""M2N2: natural-niche competition and attraction over an archive of candidates.

After "Competition and Attraction Improve Model Fusion" (Abrantes, Lange, Tang 2025, arXiv:2508.16204).
The archive holds at most P members, each with its per-item score vector s_k (``Evaluation.items``, every
item of every task's search split, each in [0, 1]).

* Resource competition: z_j = sum_k s_kj (zeros replaced by 1), f_k = sum_j s_kj / z_j^alpha. An item few
  members solve is worth more to each of them (``resource_fitness``).
* Steady state, on every usable tell: while the archive has fewer than P members (empty slots) the child
  simply joins; otherwise z and f are recomputed over the P members plus the child and the argmin leaves.
  If the child ties for the minimum it is the one dropped; among tied members the oldest slot goes
  (``drop_index``). The child takes the dropped member's slot.
* Mate selection (``ask``): parent A with probability proportional to f (all zero: uniform); parent B by
  attraction g(A, B) = sum_j max(0, s_Bj / z_j^alpha - s_Aj / z_j^alpha), proportional to g over the other
  members (all zero: uniform over the others).
* Crossover with a split point and a mix w drawn fresh for every mating (not inherited): entries before
  the split take w * A + (1 - w) * B, entries from the split on take (1 - w) * A + w * B
  (``crossover``). w ~ U(0, 1); the split is uniform over 1 .. n - 1 (n = dim, or num_layers in model
  space), so both sides are non-empty (0 when n = 1).

Two modes:

* ``genome`` (recipe space): members are genomes in [0, 1]^dim. The first P asks (and any ask while fewer
  than two members are told) are fresh genomes: uniform random, or x0 then x0 + N(0, init_sigma) with
  ``init: x0``. Children get Gaussian mutation N(0, mutation_sigma) per gene, clipped to [0, 1] (the paper
  mutates only when starting from scratch, which recipe space always does). Never waits.
* ``model`` (model space): members are models, keyed by recipe hash. The first asks return the
  ``initial`` recipes (e.g. each expert's identity recipe) to be scored; each child is then the recipe
  ``make_child(model_a, model_b, split, mix)`` where a member's model string is the one it came with
  (initial members) or ``candidate_ref(recipe_hash)`` (children); ``parents`` are the two recipe hashes and
  ``info`` holds split and mix. Asks return None while fewer than two members are told. A child whose
  recipe hash is already a member does not join twice.

Failed evaluations (or non-finite scalars) never enter the archive. Draws for ask i come from
``stream(seed, 'm2n2', i)``; mate selection uses the archive as told so far, so asks with candidates in
flight are fine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from evomerge.errors import RecipeError
from evomerge.recipe.schema import Recipe
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
    usable,
)
from evomerge.search.rng import stream
from evomerge.search.types import Candidate, Evaluation, candidate_ref

MakeChild = Callable[[str, str, int, float], Recipe]


class M2N2Settings(OptimizerSettings):
    mode: Literal["genome", "model"] | None = Field(
        None, description="None: 'model' when initial recipes are given, else 'genome'"
    )
    archive_size: int = Field(20, ge=2, description="P, the archive's slots")
    alpha: float = Field(1.0, ge=0, description="resource competition exponent (0: plain sum of scores)")
    mutation_sigma: float = Field(0.01, ge=0, le=1, description="genome mode: Gaussian mutation per gene")
    init: Literal["random", "x0"] = Field(
        "random", description="genome mode: how the archive is first filled"
    )
    init_sigma: float = Field(0.1, ge=0, le=1, description="genome mode, init x0: noise around x0")


def resource_fitness(scores: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(f, z) for a (members, items) score matrix: z_j = sum_k s_kj (0 -> 1), f_k = sum_j s_kj / z_j^alpha."""
    s = np.asarray(scores, dtype=np.float64)
    z = s.sum(axis=0)
    z[z == 0] = 1.0
    return (s / z**alpha).sum(axis=1), z


def attraction(scores: np.ndarray, z: np.ndarray, a: int, alpha: float = 1.0) -> np.ndarray:
    """g(a, k) = sum_j max(0, s_kj / z_j^alpha - s_aj / z_j^alpha) for every member k (g(a, a) = 0)."""
    w = np.asarray(scores, dtype=np.float64) / z**alpha
    return np.maximum(0.0, w - w[a]).sum(axis=1)


def crossover(a: np.ndarray, b: np.ndarray, split: int, mix: float) -> np.ndarray:
    """Entries [0, split) take mix * a + (1 - mix) * b; entries [split, n) take (1 - mix) * a + mix * b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = (1.0 - mix) * a + mix * b
    out[:split] = mix * a[:split] + (1.0 - mix) * b[:split]
    return out


def drop_index(f: np.ndarray) -> int:
    """The member to drop from P + 1 fitnesses (the child last): the child if it ties for the minimum,
    else the oldest (lowest index) member at the minimum."""
    low = np.flatnonzero(f == f.min())
    return int(low[-1]) if low[-1] == len(f) - 1 else int(low[0])


def _pick(rng: np.random.Generator, weights: np.ndarray, allowed: np.ndarray) -> int:
    """An index drawn proportional to weights over allowed ones (uniform over allowed if all are 0)."""
    w = np.where(allowed, np.maximum(weights, 0.0), 0.0)
    total = w.sum()
    p = w / total if total > 0 else allowed / allowed.sum()
    return int(rng.choice(len(p), p=p))


class M2N2:
    """Steady-state niche competition; see the module docstring for the exact rules."""

    name = "m2n2"
    generational = False
    Settings = M2N2Settings

    def __init__(
        self,
        settings: M2N2Settings | dict[str, Any] | None = None,
        *,
        seed: int,
        dim: int | None = None,
        x0: Sequence[float] | np.ndarray | None = None,
        initial: Sequence[tuple[str, Recipe]] | None = None,
        make_child: MakeChild | None = None,
        num_layers: int | None = None,
    ):
        self.settings: M2N2Settings = parse_settings(M2N2Settings, settings, self.name)
        self.seed = int(seed)
        s = self.settings
        self.mode = s.mode or ("model" if initial is not None else "genome")
        if self.mode == "genome":
            if initial is not None or make_child is not None:
                raise ValueError("m2n2 in genome mode takes no 'initial' recipes or 'make_child'")
            self.dim: int | None = check_dim(dim)
            self.x0 = check_x0(x0, self.dim)
            if s.init == "x0" and self.x0 is None:
                raise RecipeError(
                    "optimizer 'm2n2' settings: init: 'x0' needs the space's x0, none was given"
                )
            self.num_layers: int | None = None
            self.initial: list[tuple[str, Recipe]] = []
        else:
            bad = {"mutation_sigma", "init", "init_sigma"} & s.model_fields_set
            if bad:
                raise RecipeError(f"optimizer 'm2n2' settings: {', '.join(sorted(bad))}: genome mode only")
            if not initial or len(initial) < 2:
                raise ValueError("m2n2 in model mode needs 'initial': at least two (model, recipe) pairs")
            for model, recipe in initial:
                if not isinstance(model, str) or not isinstance(recipe, Recipe):
                    raise TypeError("m2n2 'initial' entries must be (model string, Recipe) pairs")
            if not callable(make_child):
                raise TypeError(
                    "m2n2 in model mode needs 'make_child(model_a, model_b, split, mix) -> Recipe'"
                )
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
                raise ValueError(f"m2n2 in model mode needs num_layers >= 1, got {num_layers!r}")
            self.dim, self.x0, self.num_layers = None, None, num_layers
            self.initial = list(initial)
        self.make_child = make_child
        self._next_id = 0
        self._fresh_asked = 0  # genome mode: fresh genomes; model mode: initial recipes handed out
        self._pending: dict[int, dict[str, Any]] = {}
        self._members: list[dict[str, Any]] = []  # slot order; each: id, hash, genome | model, scalar
        self._scores: list[np.ndarray] = []  # per-item scores, parallel to _members
        self._best = BestTracker()

    # -- asking -------------------------------------------------------------------------------------

    def ask(self) -> Candidate | None:
        cid = self._next_id
        if self.mode == "model":
            if self._fresh_asked < len(self.initial):
                model, recipe = self.initial[self._fresh_asked]
                info = {"initial": self._fresh_asked, "model": model}
                self._fresh_asked += 1
                self._pending[cid] = {"model": model}
                self._next_id += 1
                return Candidate(id=cid, recipe=recipe, info=info)
            if len(self._members) < 2:
                return None
            return self._child(cid)
        if self._fresh_asked < self.settings.archive_size or len(self._members) < 2:
            self._fresh_asked += 1
            genome = self._fresh_genome(cid)
            self._pending[cid] = {"genome": genome}
            self._next_id += 1
            return Candidate(id=cid, genome=tuple(genome), info={"fresh": True})
        return self._child(cid)

    def _fresh_genome(self, cid: int) -> list[float]:
        assert self.dim is not None
        rng = stream(self.seed, "m2n2-init", cid)
        if self.settings.init == "x0":
            assert self.x0 is not None
            if cid == 0:
                return list(genome_tuple(self.x0))
            noise = rng.normal(0.0, self.settings.init_sigma, self.dim)
            return list(genome_tuple(np.clip(self.x0 + noise, 0.0, 1.0)))
        return list(genome_tuple(rng.random(self.dim)))

    def _child(self, cid: int) -> Candidate:
        rng = stream(self.seed, "m2n2", cid)
        a, b = self.mates(rng)
        n = self.dim if self.mode == "genome" else self.num_layers
        assert n is not None
        split = int(rng.integers(1, n)) if n >= 2 else 0
        mix = float(rng.random())
        ma, mb = self._members[a], self._members[b]
        info = {"split": split, "mix": mix}
        self._next_id += 1
        if self.mode == "genome":
            child = crossover(np.asarray(ma["genome"]), np.asarray(mb["genome"]), split, mix)
            if self.settings.mutation_sigma > 0:
                child = child + rng.normal(0.0, self.settings.mutation_sigma, len(child))
            genome = list(genome_tuple(np.clip(child, 0.0, 1.0)))
            self._pending[cid] = {"genome": genome}
            return Candidate(id=cid, genome=tuple(genome), parents=(ma["hash"], mb["hash"]), info=info)
        assert self.make_child is not None
        recipe = self.make_child(ma["model"], mb["model"], split, mix)
        if not isinstance(recipe, Recipe):
            raise TypeError(f"make_child returned {type(recipe).__name__}, expected a Recipe")
        self._pending[cid] = {"model": None}
        return Candidate(id=cid, recipe=recipe, parents=(ma["hash"], mb["hash"]), info=info)

    def mates(self, rng: np.random.Generator) -> tuple[int, int]:
        """Archive slots of parents A (proportional to f) and B (proportional to attraction to A)."""
        scores = np.stack(self._scores)
        f, z = resource_fitness(scores, self.settings.alpha)
        n = len(f)
        a = _pick(rng, f, np.ones(n, dtype=bool))
        others = np.arange(n) != a
        b = _pick(rng, attraction(scores, z, a, self.settings.alpha), others)
        return a, b

    # -- telling ------------------------------------------------------------------------------------

    def tell(self, evaluation: Evaluation) -> None:
        """Admit a usable evaluation to the archive (steady state); bad item scores are a ValueError
        that leaves the optimizer unchanged."""
        pending = self._pending.get(evaluation.candidate_id)
        if pending is None:
            raise unknown_candidate(evaluation.candidate_id)
        items = evaluation.items_array()
        if usable(evaluation):
            self._check_items(evaluation.candidate_id, items)
        del self._pending[evaluation.candidate_id]
        self._best.offer(evaluation)
        if not usable(evaluation):
            return
        if self.mode == "model" and any(m["hash"] == evaluation.recipe_hash for m in self._members):
            return
        member: dict[str, Any] = {
            "id": evaluation.candidate_id,
            "hash": evaluation.recipe_hash,
            "scalar": float(evaluation.scalar),
        }
        if self.mode == "genome":
            member["genome"] = pending["genome"]
        else:
            member["model"] = pending["model"] or candidate_ref(evaluation.recipe_hash)
        self._admit(member, items)

    def _check_items(self, cid: int, items: np.ndarray) -> None:
        if items.ndim != 1 or items.size == 0:
            raise ValueError(f"candidate {cid}: m2n2 needs per-item scores, got none")
        if self._scores and items.shape != self._scores[0].shape:
            raise ValueError(
                f"candidate {cid}: {items.size} item scores, the archive has {self._scores[0].size}"
            )
        if not np.all(np.isfinite(items)) or items.min() < 0.0 or items.max() > 1.0:
            raise ValueError(f"candidate {cid}: item scores must lie in [0, 1]")

    def _admit(self, member: dict[str, Any], items: np.ndarray) -> None:
        if len(self._members) < self.settings.archive_size:
            self._members.append(member)
            self._scores.append(items)
            return
        f, _ = resource_fitness(np.stack([*self._scores, items]), self.settings.alpha)
        drop = drop_index(f)
        if drop == len(self._members):
            return
        self._members[drop] = member
        self._scores[drop] = items

    # -- reporting and state ------------------------------------------------------------------------

    def best(self) -> Evaluation | None:
        return self._best.best

    def archive(self) -> list[dict[str, Any]]:
        """The members in slot order, each with id, hash, genome or model, scalar, items and fitness f."""
        if not self._members:
            return []
        f, _ = resource_fitness(np.stack(self._scores), self.settings.alpha)
        return [
            {**m, "items": s.tolist(), "fitness": float(fk)}
            for m, s, fk in zip(self._members, self._scores, f, strict=True)
        ]

    def _header(self) -> dict[str, Any]:
        extra = {
            "mode": self.mode,
            "num_layers": self.num_layers,
            "initial": [[m, r.content_hash()] for m, r in self.initial],
            "x0": None if self.x0 is None else self.x0.tolist(),
        }
        return {**header(self.name, self.seed, self.dim, self.settings), **extra}

    def state(self) -> dict[str, Any]:
        return {
            **self._header(),
            "next_id": self._next_id,
            "fresh_asked": self._fresh_asked,
            "pending": [[cid, p] for cid, p in sorted(self._pending.items())],
            "members": [{**m, "items": s.tolist()} for m, s in zip(self._members, self._scores, strict=True)],
            "best": self._best.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        check_header(state, self._header())
        self._next_id = int(state["next_id"])
        self._fresh_asked = int(state["fresh_asked"])
        self._pending = {int(cid): dict(p) for cid, p in state["pending"]}
        self._members, self._scores = [], []
        for m in state["members"]:
            m = dict(m)
            self._scores.append(np.asarray(m.pop("items"), dtype=np.float64))
            self._members.append(m)
        self._best.load(state["best"])
