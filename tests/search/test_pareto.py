"""Pareto dominance, exact hypervolume (against inclusion-exclusion and Monte Carlo) and ParetoArchive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.search.pareto import (
    ParetoArchive,
    dominates,
    hypervolume,
    non_dominated,
    nondominated_fronts,
)


def hv_inclusion_exclusion(points, reference) -> float:
    """Volume of the union of boxes [r, p] by inclusion-exclusion (exponential: small sets only)."""
    q = np.asarray(points, dtype=float) - np.asarray(reference, dtype=float)
    q = q[np.all(q > 0, axis=1)]
    total = 0.0
    for k in range(1, len(q) + 1):
        for subset in itertools.combinations(range(len(q)), k):
            total += (-1) ** (k + 1) * np.prod(q[list(subset)].min(axis=0))
    return float(total)


def test_dominates_is_strict_somewhere():
    assert dominates([2, 1], [1, 1])
    assert not dominates([1, 1], [1, 1])
    assert not dominates([2, 0], [1, 1])


def test_non_dominated_hand_case_keeps_duplicates():
    pts = [[1, 2], [2, 1], [1, 1], [2, 1], [0, 3], [0, 2]]
    assert non_dominated(pts) == [0, 1, 3, 4]
    assert non_dominated([]) == []


def test_fronts_partition_and_order():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 4, size=(30, 3)).astype(float)
    fronts = nondominated_fronts(pts)
    assert sorted(i for f in fronts for i in f) == list(range(30))
    assert fronts[0] == non_dominated(pts)
    for r, front in enumerate(fronts):
        later = [i for f in fronts[r + 1 :] for i in f]
        for j in later:  # every later point is dominated by something in this front or above
            assert any(dominates(pts[i], pts[j]) for f in fronts[: r + 1] for i in f)
        for i, j in itertools.product(front, front):
            assert not dominates(pts[i], pts[j])


def test_non_finite_points_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        non_dominated([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[1.0, float("inf")]])


@pytest.mark.parametrize(
    ("points", "reference", "expected"),
    [
        ([[1, 3], [2, 2], [3, 1]], None, 6.0),
        ([[1, 3], [2, 2], [3, 1], [1, 1]], None, 6.0),  # a dominated point adds nothing
        ([[2, 2]], [1, 1], 1.0),
        ([[0, 5], [3, 0]], None, 0.0),  # on the reference's boundary: no volume
        ([[1, 2, 3]], None, 6.0),
        ([[2, 1, 1], [1, 2, 1]], None, 3.0),
        ([[2, 1, 1], [1, 2, 1], [1, 1, 2]], None, 4.0),
        ([[1, 1, 1, 1], [2, 2, 2, 0.5]], None, 1 + 8 * 0.5 - 0.5),
        ([[3.0]], [1.0], 2.0),
    ],
)
def test_hypervolume_hand_cases(points, reference, expected):
    assert hypervolume(points, reference) == pytest.approx(expected)


@pytest.mark.parametrize("d", [2, 3, 4, 5])
def test_hypervolume_matches_inclusion_exclusion(d):
    rng = np.random.default_rng(d)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        pts = rng.random((n, d))
        if rng.random() < 0.5:  # ties in coordinates exercise the slicing
            pts = np.round(pts * 4) / 4
        ref = rng.random(d) * 0.3
        assert hypervolume(pts, ref) == pytest.approx(hv_inclusion_exclusion(pts, ref), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 4).flatmap(
        lambda d: st.lists(
            st.lists(st.floats(-1, 2, allow_nan=False), min_size=d, max_size=d), min_size=1, max_size=6
        )
    )
)
def test_hypervolume_property(points):
    d = len(points[0])
    ref = [0.0] * d
    assert hypervolume(points, ref) == pytest.approx(hv_inclusion_exclusion(points, ref), rel=1e-9, abs=1e-12)


def test_hypervolume_monte_carlo_3d():
    rng = np.random.default_rng(7)
    pts = rng.random((12, 3))
    samples = rng.random((200_000, 3))
    covered = np.zeros(len(samples), dtype=bool)
    for p in pts:
        covered |= np.all(samples <= p, axis=1)
    assert hypervolume(pts) == pytest.approx(covered.mean(), abs=0.01)


def test_archive_front_and_history():
    arc = ParetoArchive()
    assert arc.add("a", [1, 1])
    assert arc.add("b", [2, 0.5])
    assert not arc.add("c", [0.5, 0.5])  # dominated by a
    assert arc.add("d", [2, 1])  # dominates a and b
    assert arc.add("e", [2, 1])  # a duplicate stays
    assert arc.add("f", [0.5, 3])
    assert arc.keys() == ["d", "e", "f"]
    assert arc.members()[0] == ("d", (2.0, 1.0))
    assert arc.history == pytest.approx([1.0, 1.5, 1.5, 2.0, 2.0, 2 + 0.5 * 2])
    assert all(b >= a for a, b in itertools.pairwise(arc.history))
    assert arc.hypervolume() == pytest.approx(3.0)
    assert arc.hypervolume([0.5, 0.5]) == pytest.approx(0.75)  # f sits on the reference: no volume
    assert len(arc) == 3 and arc.num_objectives == 2
    assert arc.summary()["hypervolume"] == pytest.approx(3.0)


def test_archive_matches_batch_computation():
    rng = np.random.default_rng(3)
    pts = rng.random((40, 3))
    arc = ParetoArchive(reference=[0.1, 0.1, 0.1])
    for i, p in enumerate(pts):
        arc.add(i, p)
        assert arc.history[-1] == pytest.approx(hypervolume(pts[: i + 1], [0.1, 0.1, 0.1]))
    assert arc.keys() == non_dominated(pts)


def test_archive_rejects_bad_input():
    arc = ParetoArchive()
    arc.add("a", [1, 2])
    with pytest.raises(ValueError, match="already"):
        arc.add("a", [3, 3])
    with pytest.raises(ValueError, match="finite"):
        arc.add("b", [float("-inf"), 1])
    with pytest.raises(ValueError, match="objectives"):
        arc.add("c", [1, 2, 3])
    assert ParetoArchive().hypervolume() == 0.0
