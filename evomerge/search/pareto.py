"""Pareto dominance, exact hypervolume and the non-dominated archive kept over every evaluated candidate.

Every objective is maximised. ``p`` dominates ``q`` when p >= q in every objective and p > q in at least
one; equal points therefore do not dominate each other and duplicates are all kept as non-dominated.
Non-finite objective values are rejected with a ValueError (a failed candidate has no place on a front).

Hypervolume is the Lebesgue measure of the region dominated by the points and dominating the reference
point r: the union of the boxes [r, p] over points p > r (points not strictly above r in every objective
add nothing). It is exact for any number of objectives: one objective is a maximum, two a sweep over the
points sorted by the first objective, and more are computed by slicing along the last objective (HSO,
"hypervolume by slicing objectives", While et al. 2006): between consecutive levels of the last objective
the dominated region is a (d-1)-dimensional hypervolume times the slab's thickness. Cost grows like
n^(d-1): meant for fronts of tens to a few hundred points and a handful of objectives.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


def _as_points(points: Sequence[Sequence[float]] | np.ndarray, what: str = "points") -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, arr.shape[-1] if arr.ndim == 2 else 0)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a (points, objectives) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite (failed candidates have no place on a Pareto front)")
    return arr


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """Whether p dominates q (maximisation)."""
    a, b = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return bool(np.all(a >= b) and np.any(a > b))


def non_dominated(points: Sequence[Sequence[float]] | np.ndarray) -> list[int]:
    """Indices (ascending) of the points no other point dominates; duplicates are all kept."""
    arr = _as_points(points)
    n = len(arr)
    keep = []
    for i in range(n):
        ge = np.all(arr >= arr[i], axis=1)
        gt = np.any(arr > arr[i], axis=1)
        if not np.any(ge & gt):
            keep.append(i)
    return keep


def nondominated_fronts(points: Sequence[Sequence[float]] | np.ndarray) -> list[list[int]]:
    """Fast non-dominated sort (Deb et al. 2002): front 0 is non-dominated, front 1 is non-dominated once
    front 0 is removed, and so on. Indices inside a front are ascending."""
    arr = _as_points(points)
    n = len(arr)
    if n == 0:
        return []
    ge = np.all(arr[:, None, :] >= arr[None, :, :], axis=2)
    gt = np.any(arr[:, None, :] > arr[None, :, :], axis=2)
    dom = ge & gt  # dom[i, j]: i dominates j
    count = dom.sum(axis=0)  # how many dominate j
    fronts = []
    current = [int(j) for j in np.flatnonzero(count == 0)]
    while current:
        fronts.append(current)
        for i in current:
            count[dom[i]] -= 1
        count[current] = -1
        current = [int(j) for j in np.flatnonzero(count == 0)]
    return fronts


def hypervolume(
    points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float] | np.ndarray | None = None
) -> float:
    """Exact hypervolume dominated by ``points`` above ``reference`` (default: 0 for every objective)."""
    arr = _as_points(points)
    if arr.size == 0:
        return 0.0
    d = arr.shape[1]
    ref = np.zeros(d) if reference is None else np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape != (d,):
        raise ValueError(f"reference has {ref.size} entries, the points have {d} objectives")
    if not np.all(np.isfinite(ref)):
        raise ValueError("reference must be finite")
    q = arr - ref
    q = q[np.all(q > 0, axis=1)]
    if len(q) == 0:
        return 0.0
    return float(_hv(q[non_dominated(q)]))


def _hv(q: np.ndarray) -> float:
    """Hypervolume of positive points q against the origin."""
    d = q.shape[1]
    if d == 1:
        return float(q[:, 0].max())
    if d == 2:
        order = np.argsort(-q[:, 0], kind="stable")
        total, top = 0.0, 0.0
        xs = q[order, 0]
        ys = q[order, 1]
        for i in range(len(order)):
            top = max(top, ys[i])
            nxt = xs[i + 1] if i + 1 < len(order) else 0.0
            total += (xs[i] - nxt) * top
        return total
    order = np.argsort(-q[:, -1], kind="stable")
    q = q[order]
    total = 0.0
    for i in range(len(q)):
        nxt = q[i + 1, -1] if i + 1 < len(q) else 0.0
        thickness = q[i, -1] - nxt
        if thickness > 0:
            slab = q[: i + 1, :-1]
            total += _hv(slab[non_dominated(slab)]) * thickness
    return total


class ParetoArchive:
    """The non-dominated set of everything added so far, with the hypervolume after every add.

    ``add(key, objectives)`` returns whether the point joined the front (points it dominates leave).
    ``history`` holds the hypervolume against ``reference`` (default 0 for every objective) after each
    add, dominated adds included, so it is non-decreasing. Keys are unique; non-finite objectives and a
    wrong number of objectives are ValueErrors.
    """

    def __init__(self, reference: Sequence[float] | None = None):
        self.reference = None if reference is None else [float(v) for v in reference]
        self._keys: list[Hashable] = []
        self._points: list[tuple[float, ...]] = []
        self._seen: set[Hashable] = set()
        self.history: list[float] = []
        self._dim: int | None = None if reference is None else len(self.reference)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def num_objectives(self) -> int | None:
        return self._dim

    def add(self, key: Hashable, objectives: Sequence[float]) -> bool:
        point = tuple(float(v) for v in objectives)
        if key in self._seen:
            raise ValueError(f"key {key!r} was already added to the Pareto archive")
        if not point or not all(np.isfinite(point)):
            raise ValueError(f"key {key!r}: objectives must be finite and non-empty, got {list(point)}")
        if self._dim is None:
            self._dim = len(point)
        elif len(point) != self._dim:
            raise ValueError(f"key {key!r}: {len(point)} objectives, the archive has {self._dim}")
        self._seen.add(key)
        joined = not any(dominates(p, point) for p in self._points)
        if joined:
            keep = [i for i, p in enumerate(self._points) if not dominates(point, p)]
            self._keys = [self._keys[i] for i in keep] + [key]
            self._points = [self._points[i] for i in keep] + [point]
            self.history.append(self.hypervolume())
        else:
            self.history.append(self.history[-1])
        return joined

    def members(self) -> list[tuple[Hashable, tuple[float, ...]]]:
        """(key, objectives) of the front, in the order they were added."""
        return list(zip(self._keys, self._points, strict=True))

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def hypervolume(self, reference: Sequence[float] | None = None) -> float:
        ref = self.reference if reference is None else reference
        if not self._points:
            return 0.0
        return hypervolume(self._points, ref)

    def summary(self) -> dict[str, Any]:
        """JSON-able view: members and the latest hypervolume."""
        return {
            "members": [{"key": k, "objectives": list(p)} for k, p in self.members()],
            "hypervolume": self.history[-1] if self.history else 0.0,
        }
